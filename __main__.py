"""The command line (see pipeline/cli.py), run either way:

- ``python -m sdxl_controlnet_img2img ...`` after a pip install of the pack;
- ``python custom_nodes/<pack folder> ...`` with ComfyUI's python in a ComfyUI install (ComfyUI-Manager clones the
  pack there and installs only its requirements). Then this file runs with no package, so the folder is imported as
  a package named after itself, as ComfyUI imports it (a name with dashes is fine), without its ``__init__.py``: the
  command line needs no ComfyUI node.
"""

import sys

if __package__:
    from .pipeline.cli import main
else:
    import importlib
    import importlib.machinery
    import os
    import types

    root = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == root:
        del sys.path[0]  # the pack's subfolders (tests, pipeline, ...) are not top-level modules
    name = os.path.basename(root).replace(".", "_")
    package = types.ModuleType(name)
    package.__path__ = [root]
    package.__file__ = os.path.join(root, "__init__.py")
    package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    package.__spec__.submodule_search_locations = [root]
    sys.modules[name] = package
    main = importlib.import_module(f"{name}.pipeline.cli").main

sys.exit(main())
