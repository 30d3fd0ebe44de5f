"""The paper's analyses as job kinds: occlusion (Fig. 7), invariance (Fig. 5), correspondence
(Table 1) and transfer probes (Tables 4, 5, 7).

Each kind is a package (``spec``, ``tables``, ``work`` and ``driver`` modules, its ``KIND`` in
``__init__``); all of them run on the same worker (:mod:`.worker`). The science is in
``zfcore.analyses``; the work modules read images, batch them and draw the pictures.
"""
