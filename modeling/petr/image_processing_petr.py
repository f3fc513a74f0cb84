"""PETR pre-processing (official ResizeCropFlipImage + NormalizeMultiviewImage): resize, crop keeping the
bottom rows, optional flip; the same 2-D augmentation is folded into the intrinsics so lidar2img stays exact."""
import numpy as np
import torch
from PIL import Image


class PetrImageProcessor:
    """Turns per-camera images + calibration into `pixel_values` (N, 3, H, W) and `lidar2img` (N, 4, 4).

    final_size: (H, W) network input (a multiple of 32 avoids padding). Test-time resize is
    max(H/h, W/w) as in the official code; training draws the resize from `resize_lim`, the crop column
    uniformly, and flips with probability 0.5 when `rand_flip`.
    """

    def __init__(self, final_size=(320, 800), resize_lim=None, rand_flip=False,
                 image_mean=(103.53, 116.28, 123.675), image_std=(57.375, 57.12, 58.395), to_bgr=True):
        self.final_size = tuple(final_size)
        self.resize_lim = resize_lim
        self.rand_flip = rand_flip
        self.image_mean = np.asarray(image_mean, np.float32)
        self.image_std = np.asarray(image_std, np.float32)
        self.to_bgr = to_bgr

    def augmentation(self, image_hw, train=False, rng=None):
        """(resize, crop=(x0, y0, x1, y1), flip) for one image, the official sampling."""
        fH, fW = self.final_size
        H, W = image_hw
        if train and self.resize_lim is not None:
            rng = rng if rng is not None else np.random.default_rng()
            resize = float(rng.uniform(*self.resize_lim))
            newW, newH = int(W * resize), int(H * resize)
            crop_h = newH - fH
            crop_w = int(rng.uniform(0, max(0, newW - fW)))
            flip = bool(self.rand_flip and rng.uniform() < 0.5)
        else:
            resize = max(fH / H, fW / W)
            newW, newH = int(W * resize), int(H * resize)
            crop_h = newH - fH
            crop_w = int(max(0, newW - fW) / 2)
            flip = False
        return resize, (crop_w, crop_h, crop_w + fW, crop_h + fH), flip

    @staticmethod
    def augmentation_matrix(resize, crop, flip):
        """3x3 matrix mapping original pixels to network-input pixels."""
        m = np.array([[resize, 0, -crop[0]], [0, resize, -crop[1]], [0, 0, 1]], dtype=np.float64)
        if flip:
            m = np.array([[-1, 0, crop[2] - crop[0]], [0, 1, 0], [0, 0, 1]], dtype=np.float64) @ m
        return m

    def __call__(self, images, intrinsics, lidar2cam, train=False, rng=None):
        """images: N RGB uint8 arrays (h, w, 3) or PIL images; intrinsics (N, 3, 3); lidar2cam (N, 4, 4)."""
        if not (len(images) == len(intrinsics) == len(lidar2cam)):
            raise ValueError(f"got {len(images)} images, {len(intrinsics)} intrinsics, {len(lidar2cam)} "
                             "extrinsics; pass one of each per camera.")
        pixels, l2i = [], []
        for img, K, ext in zip(images, intrinsics, lidar2cam):
            img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8))
            resize, crop, flip = self.augmentation((img.height, img.width), train, rng)
            img = img.resize((int(img.width * resize), int(img.height * resize)), Image.BILINEAR).crop(crop)
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(img, np.float32)
            if self.to_bgr:
                arr = arr[..., ::-1]
            arr = (arr - self.image_mean) / self.image_std
            pixels.append(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
            K4 = np.eye(4)
            K4[:3, :3] = self.augmentation_matrix(resize, crop, flip) @ np.asarray(K, np.float64)
            l2i.append(torch.from_numpy(K4 @ np.asarray(ext, np.float64)).float())
        return {"pixel_values": torch.stack(pixels), "lidar2img": torch.stack(l2i)}


def align_previous_lidar2img(lidar2img_prev, prev_lidar_from_curr_lidar):
    """PETRv2: express a previous frame's cameras in the current LiDAR frame, so one 3D PE covers both."""
    return lidar2img_prev @ prev_lidar_from_curr_lidar
