"""`ImageFiles`: training images kept on disk and decoded on demand in `tf.data`.

Clothing1M has a million JPEGs, far more than fit in memory once decoded. GAL's
batch plan (CDAS, §3.1) needs only the labels, so the images can stay on disk:
`ImageFiles` stands in for a uint8 `[N, H, W, C]` array, and the input pipeline
(`galkeras.sampling`) reads and decodes just the files of each batch.
"""

import concurrent.futures
import os

import numpy as np

# The file names that count as images when a folder is searched (`folder:PATH`
# datasets, `python -m galkeras.predict`).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

# Leading bytes of the image formats `tf.io.decode_image` reads.
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
)


class ImageFiles:
    """N image files, each decoded to uint8 and resized to one `(H, W, C)`.

    It behaves like the uint8 image array it replaces where galkeras needs one:
    `len`, `shape`, `dtype`, `ndim`, and `files[ids]`, which decodes those
    images eagerly into a NumPy array (for small subsets and tests). Inside a
    `tf.data` pipeline, `decode_paths` decodes a batch of paths in the graph.

    Args:
        paths: sequence of N file paths (JPEG, PNG, GIF or BMP).
        image_size: `(H, W)`. Every image is resized to it (bilinear, with
            antialiasing), ignoring its aspect ratio.
        channels: 3 (RGB) or 1 (greyscale); images are converted to it.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths, image_size, channels=3):
        paths = np.asarray([os.fspath(p) for p in paths], dtype=object)
        if paths.ndim != 1 or len(paths) == 0:
            raise ValueError("ImageFiles needs a non-empty 1-D list of paths.")
        size = tuple(int(d) for d in image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(
                f"ImageFiles image_size must be two positive ints (H, W); got "
                f"{image_size!r}."
            )
        if channels not in (1, 3):
            raise ValueError(f"ImageFiles channels must be 1 or 3; got {channels}.")
        self.paths = paths
        self.image_size = size
        self.channels = channels

    def __len__(self):
        return len(self.paths)

    @property
    def shape(self):
        """`(N, H, W, C)`, the shape of the array these files decode to."""
        return (len(self.paths), *self.image_size, self.channels)

    def subset(self, ids):
        """The files at `ids`, as a new `ImageFiles` with the same decoding."""
        return ImageFiles(self.paths[np.asarray(ids)], self.image_size, self.channels)

    def __getitem__(self, ids):
        """Decodes the images at `ids` (an int array or slice) into uint8 NumPy."""
        import tensorflow as tf

        paths = np.atleast_1d(self.paths[ids]).astype(str)
        return self.decode_paths(tf.constant(paths)).numpy()

    def decode(self, path):
        """One image as a uint8 `(H, W, C)` tensor: read, decode, resize."""
        import tensorflow as tf

        return decode_image(tf.io.read_file(path), self.image_size, self.channels)

    def decode_paths(self, paths):
        """A batch of path strings `[b]` as uint8 images `[b, H, W, C]` (graph op)."""
        import tensorflow as tf

        return tf.map_fn(
            self.decode,
            paths,
            fn_output_signature=tf.TensorSpec(
                (*self.image_size, self.channels), tf.uint8
            ),
            parallel_iterations=16,
        )


def decode_image(contents, image_size=None, channels=3):
    """Encoded image bytes as a uint8 `(H, W, channels)` tensor, as training
    decodes every image file.

    `tf.io.decode_image` converts the file's channels: greyscale is repeated into
    RGB, an alpha channel is dropped, and RGB becomes greyscale for
    `channels=1`. The image is then resized to `image_size` (bilinear, with
    antialiasing, ignoring the aspect ratio), which leaves an image of that size
    unchanged.

    Args:
        contents: scalar string tensor (or bytes), the file's contents.
        image_size: `(H, W)`, or None to keep the image's own size.
        channels: 3 (RGB) or 1 (greyscale).

    Raises:
        tf.errors.InvalidArgumentError: for contents that are not a JPEG, PNG,
            GIF, BMP or WebP image, or that TensorFlow cannot convert to
            `channels` (a GIF to greyscale).
    """
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=channels, expand_animations=False)
    if image_size is None:
        return image
    image = tf.image.resize(image, image_size, antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(image, (*image_size, channels))


def find_bad_image_files(paths, num_threads=16):
    """The paths that are missing, empty or not an image, with the reason.

    Reads only each file's first bytes (a format signature), in threads, so a
    million files are checked in about a minute. A file with a valid signature
    but a damaged body is found only when it is decoded.

    Args:
        paths: sequence of file paths.
        num_threads: int, files checked at once.

    Returns:
        A list of `(index, reason)` pairs, in index order.
    """

    def check(path):
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError as error:
            return error.strerror or str(error)
        if not head:
            return "empty file"
        if not head.startswith(_SIGNATURES):
            return "not a JPEG, PNG, GIF or BMP image"
        return None

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        reasons = list(pool.map(check, paths, chunksize=256))
    return [(i, reason) for i, reason in enumerate(reasons) if reason is not None]
