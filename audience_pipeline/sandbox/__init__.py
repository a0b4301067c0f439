"""Local HTTP sandbox emulating the vendors' import APIs, for the demo and the integration tests."""

from audience_pipeline.sandbox.app import SandboxSettings, SandboxVendor, build_app
from audience_pipeline.sandbox.server import SandboxServer, serve_forever

__all__ = ["SandboxServer", "SandboxSettings", "SandboxVendor", "build_app", "serve_forever"]
