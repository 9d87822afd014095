"""The gRPC edge server (edge_embed.v1): batching, health, reflection, metrics, auth."""

from .app import EdgeServer, create_server, serve
from .config import ServerConfig

__all__ = ["EdgeServer", "ServerConfig", "create_server", "serve"]
