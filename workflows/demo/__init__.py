"""The embedded demo data set: captioned synthetic shapes, their pixel checker and a loopback server."""
