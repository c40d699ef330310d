"""The fal endpoint this pack runs remotely and serves, written once: the fal client submits to it
(:mod:`.fal`), the server answers it (:mod:`.serve`), and the nodes, the CLI and the logs name it."""

ENDPOINT = "fal-ai/fast-sdxl-controlnet-canny/image-to-image"
# the id without its sub-path: what fal's clients put in a request's status, result and cancel URLs
ENDPOINT_BASE = ENDPOINT.rpartition("/")[0]
