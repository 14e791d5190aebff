"""fedbench's built-in plugins, installed as ``fedbench_plugins`` and loaded through the ``fedbench``
entry-point group exactly like a third-party package's. The core never imports this package."""
