"""Entry point the Dify plugin daemon runs (`python -m main`)."""

from dify_plugin import DifyPluginEnv, Plugin

# Dify's own read timeout toward models; the server's SSE keep-alives keep long prefills inside it.
plugin = Plugin(DifyPluginEnv(MAX_REQUEST_TIMEOUT=300))

if __name__ == "__main__":
    plugin.run()
