"""ibisagent: interactive, text-prompted medical image segmentation by an agent that clicks like an annotator."""

__version__ = "0.1.0"
