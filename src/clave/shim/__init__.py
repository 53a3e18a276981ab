"""containerd-shim-clave-v2: a containerd shim v2 that drives the Clave engine in-process over ttrpc."""
