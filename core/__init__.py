"""The foundation every other sub-package stands on: the error type for bad input, atomic files and folders,
the shard commit protocol, image preprocessing and the training schedule. It imports no other ``cm3`` package."""
