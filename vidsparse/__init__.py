"""vidsparse: VideoLLaVA question answering with text-guided visual-token pruning."""

__version__ = "0.1.0"
