# Run by CPython-for-WASI at start-up, from a directory Clave's WebAssembly enclave preopens read-only.
# WASI has no working directory: enter the container's (process.cwd) before the app runs, then hand over to
# the image's own sitecustomize, if it has one. Only modules already loaded are used: importing importlib from
# the runtime's zipped stdlib would cost every start ~40 ms.
import os
import sys

_here = os.path.dirname(__file__)
_cwd = os.environ.pop("CLAVE_CWD", "")
if _cwd:
    os.chdir(_cwd)
_path = [p for p in os.environ.get("PYTHONPATH", "").split(":") if p and p != _here]
if _path:
    os.environ["PYTHONPATH"] = ":".join(_path)
else:
    os.environ.pop("PYTHONPATH", None)
if _here in sys.path:
    sys.path.remove(_here)
_spec = sys.modules["_frozen_importlib_external"].PathFinder.find_spec("sitecustomize", sys.path)
if _spec is not None and _spec.loader is not None:
    _image = sys.modules["_frozen_importlib"].module_from_spec(_spec)
    sys.modules["sitecustomize"] = _image
    _spec.loader.exec_module(_image)
