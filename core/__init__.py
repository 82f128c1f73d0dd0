"""The foundation every other sub-package stands on: the error type for bad input, atomic files and folders,
the shard commit protocol, image preprocessing and the training schedule. It imports no other ``cm3`` package."""

from .exports import lazy_exports

_EXPORTS = {  # public name -> the module that defines it
    "InputError": "errors", "atomic_write": "files", "atomic_folder": "files", "write_json": "files",
    "read_json": "files", "load_image_tensor": "images", "to_pil": "images", "square_pixels": "images",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
