"""framescribe pipeline: config, discovery, decoding, the Ray Data graph, output and CLI."""
__version__ = "0.1.0"
