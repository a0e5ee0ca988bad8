"""imc's network face: the Kubernetes-style ImageCache API (``api``), kept free of any
HTTP server so that it can be tested by calling it and wired into whichever server
serves it."""
