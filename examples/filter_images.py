"""Blur photographs and find their edges with pyconvmpi, the batch split over MPI ranks.

Rank 0 reads the images (by default the two photographs scikit-learn ships, or every image
in ``--images DIR``) and groups them by size into batches. Each filter then runs as one
``pyconvmpi.conv2d`` call in the ``root`` placement. Only rank 0 has the images and the
results, and the library splits the work over the ranks (``--strategy``, default ``batch``).
Rank 0 writes ``<name>_blur.png`` and ``<name>_edges.png`` into ``--output``.

    python examples/filter_images.py --output filtered
    OMP_NUM_THREADS=1 mpiexec -n 2 python -m mpi4py examples/filter_images.py --output filtered

Filters: a 5x5 Gaussian blur (sigma 1) on each colour channel (a depthwise convolution,
groups=3) and the Sobel gradient magnitude of the grey image (two 3x3 output channels).
Image borders are extended by reflection before the convolution, so the outputs keep the
input size without dark rims.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
STRATEGIES = ("auto", "batch", "channels", "rows", "hybrid")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", metavar="DIR", type=Path,
                        help="folder of images to filter (default: scikit-learn's two sample "
                             "photographs)")
    parser.add_argument("--output", metavar="DIR", type=Path, default=Path("filtered"),
                        help="folder for the PNG results, created if missing (default ./filtered)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="batch",
                        help="how the library splits each batch over the ranks (default batch)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="precision of the convolutions (default float32)")
    return parser.parse_args(argv)


def gaussian_kernel(size=5, sigma=1.0):
    """Return a normalised ``size`` x ``size`` Gaussian kernel."""
    offsets = np.arange(size) - (size - 1) / 2
    profile = np.exp(-offsets**2 / (2 * sigma**2))
    kernel = np.outer(profile, profile)
    return kernel / kernel.sum()


def filter_weights(dtype):
    """Return the blur weight (3, 1, 5, 5) and the Sobel weight (2, 1, 3, 3)."""
    blur = np.repeat(gaussian_kernel()[None, None], 3, axis=0).astype(dtype)
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=dtype)
    sobel = np.stack([sobel_x, sobel_x.T])[:, None]
    return blur, sobel


def load_images(folder):
    """Return a list of (name, H x W x 3 uint8 array), from ``folder`` or scikit-learn."""
    from PIL import Image

    if folder is None:
        from sklearn.datasets import load_sample_images

        samples = load_sample_images()
        return [(Path(path).stem, image) for path, image in zip(samples.filenames, samples.images)]
    if not folder.is_dir():
        raise ValueError(f"--images must be a folder; got {str(folder)!r}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(
            f"no images in {str(folder)!r}; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append((path.stem, np.asarray(image.convert("RGB"))))
    return images


def group_by_size(images):
    """Return lists of indices of ``images`` that share one height and width, in order."""
    groups = {}
    for index, (_, pixels) in enumerate(images):
        groups.setdefault(pixels.shape[:2], []).append(index)
    return list(groups.values())


def to_uint8(values):
    return (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def edge_strength(gradients):
    """Return the Sobel magnitude scaled so that its 99.5th percentile per image is white."""
    magnitude = np.sqrt(gradients[:, 0] ** 2 + gradients[:, 1] ** 2)
    scale = np.percentile(magnitude.reshape(len(magnitude), -1), 99.5, axis=1)
    return magnitude / np.maximum(scale, 1e-12)[:, None, None]


def filter_batch(pixels, comm, strategy, dtype):
    """Blur and edge-filter a batch (N x H x W x 3 uint8) on rank 0; others pass None.

    Returns (blurred N x 3 x H x W, edges N x H x W) in [0, 1] on rank 0, (None, None)
    elsewhere, and the seconds each filter's convolution took.
    """
    import pyconvmpi

    is_root = comm is None or comm.Get_rank() == 0
    distributed = {} if comm is None else dict(comm=comm, placement="root", strategy=strategy)
    blur_weight, sobel_weight = filter_weights(dtype)
    blur_input = grey_input = None
    if is_root:
        images = pixels.transpose(0, 3, 1, 2).astype(dtype) / 255.0
        # ITU-R BT.601 luma weights.
        grey = np.einsum("nchw,c->nhw", images, np.array([0.299, 0.587, 0.114], dtype=dtype))
        blur_input = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
        grey_input = np.pad(grey[:, None], ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")

    seconds = {}
    began = time.perf_counter()
    blurred = pyconvmpi.conv2d(blur_input, blur_weight if is_root else None, groups=3,
                               **distributed)
    seconds["blur"] = time.perf_counter() - began
    began = time.perf_counter()
    gradients = pyconvmpi.conv2d(grey_input, sobel_weight if is_root else None, **distributed)
    seconds["edges"] = time.perf_counter() - began
    if not is_root:
        return None, None, seconds
    return blurred, edge_strength(gradients), seconds


def save(output, name, blurred, edges):
    """Write the blurred (3 x H x W) and edge (H x W) images as PNG; return their paths."""
    from PIL import Image

    blur_path = output / f"{name}_blur.png"
    edges_path = output / f"{name}_edges.png"
    Image.fromarray(to_uint8(blurred.transpose(1, 2, 0))).save(blur_path)
    Image.fromarray(to_uint8(edges)).save(edges_path)
    return blur_path, edges_path


def main(argv=None):
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    # One rank alone needs no communicator: the call then runs on this process only.
    comm = world if size > 1 else None

    # Rank 0 reads the images and broadcasts the batches' layout (or the error), so that
    # every rank makes the same collective calls or stops together.
    images, groups, error = [], None, None
    if rank == 0:
        try:
            images = load_images(args.images)
            groups = group_by_size(images)
            args.output.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as exc:
            error = str(exc)
    groups, error = world.bcast((groups, error), root=0)
    if error is not None:
        if rank == 0:
            print(f"filter_images: {error}", file=sys.stderr)
        return 1

    if rank == 0:
        print(f"filtering {len(images)} image(s) in {len(groups)} batch(es) on {size} rank(s), "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    for indices in groups:
        pixels = np.stack([images[i][1] for i in indices]) if rank == 0 else None
        blurred, edges, seconds = filter_batch(pixels, comm, args.strategy, args.dtype)
        if rank == 0:
            n, h, w = pixels.shape[:3]
            print(f"batch of {n} image(s) {h}x{w}: blur {seconds['blur'] * 1e3:.1f} ms, "
                  f"edges {seconds['edges'] * 1e3:.1f} ms")
            for position, index in enumerate(indices):
                for path in save(args.output, images[index][0], blurred[position], edges[position]):
                    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
