"""The occlusion job kind (Fig. 7): a grey square slid over images, the response recorded."""
