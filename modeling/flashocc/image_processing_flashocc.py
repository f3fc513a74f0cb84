"""FlashOcc pre-processing: the official `PrepareImageInputs` (projects/mmdet3d_plugin/datasets/pipelines/loading.py of
Yzichen/FlashOCC @ 4084861) without mmcv.

What the official code does, read there:
- images are opened with PIL (`Image.open`), i.e. RGB, resized with `img.resize(resize_dims)` (Pillow's default
  filter: BICUBIC since Pillow 7.0), cropped, optionally flipped and rotated;
- `mmlabNormalize` calls mmcv `imnormalize(img, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
  to_rgb=True)`. mmcv assumes its input is BGR (cv2) and `to_rgb` swaps channels 0 and 2 before subtracting the mean
  and dividing by the std, both in the order given. The input was already RGB, so the swap makes it BGR: the tensor
  is (B - 123.675) / 58.395, (G - 116.28) / 57.12, (R - 103.53) / 57.375, channels in B, G, R order. The official
  weights were trained on exactly this; `bgr=True` (default) reproduces it, `bgr=False` gives the textbook RGB
  normalisation (only for models trained that way).
- test time: resize = W_in / W (+ resize_test) = 704 / 1600 = 0.44 -> 704 x 396; crop rows
  int((1 - mean(crop_h)) * 396) - 256 = 140 .. 396 (the bottom 256 rows) and columns int((704 - 704) / 2) = 0 ..;
  no flip, no rotation. Training: resize + U(resize_lim), random crop column, flip with p = 0.5 and rotation
  U(rot_lim) degrees about the crop centre.
- the augmentation is carried as post_rot (3x3, the 2x2 linear part) and post_tran (3,); `img_aug` here is the same
  map as one 3x3 homogeneous matrix (original pixel -> network pixel).
"""
import math

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}


class FlashOccImageProcessor:
    """Per-camera images + calibration -> the model's inputs.

    input_size: (H, W) network input. resize_test / crop_h: the official `data_config` test entries. bgr: keep the
    official channel order quirk (see the module docstring). resample: PIL filter of the resize ("bicubic" = Pillow's
    default, which the official call uses). Training augmentation (train=True): resize_lim, rot_lim (degrees),
    rand_flip, as in flashocc-r50.py.
    """

    def __init__(self, input_size=(256, 704), image_mean=(123.675, 116.28, 103.53),
                 image_std=(58.395, 57.12, 57.375), bgr=True, resize_test=0.0, crop_h=(0.0, 0.0),
                 resize_lim=(-0.06, 0.11), rot_lim=(-5.4, 5.4), rand_flip=True, resample="bicubic"):
        if resample not in _RESAMPLE:
            raise ValueError(f"resample={resample!r}; use one of {sorted(_RESAMPLE)}")
        self.input_size = tuple(int(v) for v in input_size)
        self.image_mean = np.asarray(image_mean, np.float64)
        self.image_std = np.asarray(image_std, np.float64)
        self.bgr = bgr
        self.resize_test = resize_test
        self.crop_h = tuple(crop_h)
        self.resize_lim = tuple(resize_lim)
        self.rot_lim = tuple(rot_lim)
        self.rand_flip = rand_flip
        self.resample = resample

    def augmentation(self, image_hw, train=False, rng=None):
        """(resize, resize_dims (W, H), crop (x0, y0, x1, y1), flip, rotate_degrees), the official sampling."""
        fh, fw = self.input_size
        H, W = image_hw
        resize = float(fw) / float(W)
        if train:
            rng = rng if rng is not None else np.random.default_rng()
            resize += float(rng.uniform(*self.resize_lim))
            new_w, new_h = int(W * resize), int(H * resize)
            crop_h = int((1 - rng.uniform(*self.crop_h)) * new_h) - fh
            crop_w = int(rng.uniform(0, max(0, new_w - fw)))
            flip = bool(self.rand_flip and rng.integers(0, 2))
            rotate = float(rng.uniform(*self.rot_lim))
        else:
            resize += self.resize_test
            new_w, new_h = int(W * resize), int(H * resize)
            crop_h = int((1 - float(np.mean(self.crop_h))) * new_h) - fh
            crop_w = int(max(0, new_w - fw) / 2)
            flip, rotate = False, 0.0
        return resize, (new_w, new_h), (crop_w, crop_h, crop_w + fw, crop_h + fh), flip, rotate

    @staticmethod
    def augmentation_matrix(resize, crop, flip=False, rotate=0.0):
        """3x3 map original pixel -> network pixel: scale, minus the crop offset, optional flip about the crop width,
        rotation by `rotate` degrees about the crop centre (the official post_rot / post_tran)."""
        m = np.array([[resize, 0.0, -crop[0]], [0.0, resize, -crop[1]], [0.0, 0.0, 1.0]])
        w, h = crop[2] - crop[0], crop[3] - crop[1]
        if flip:
            m = np.array([[-1.0, 0.0, w], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
        if rotate:
            a = rotate / 180 * math.pi
            rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
            centre = np.array([w, h]) / 2
            r3 = np.eye(3)
            r3[:2, :2] = rot
            r3[:2, 2] = centre - rot @ centre
            m = r3 @ m
        return m

    def normalize(self, image):
        """PIL image or RGB uint8 (h, w, 3) -> (3, h, w) float32, the official mmlabNormalize (BGR when bgr)."""
        arr = np.asarray(image, dtype=np.float32)
        if self.bgr:
            arr = arr[..., ::-1]
        arr = (arr - self.image_mean.astype(np.float32)) * (1.0 / self.image_std).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __call__(self, images, intrinsics, sensor2ego, ego2global=None, train=False, rng=None):
        """images: N RGB images (PIL or uint8 arrays (h, w, 3)); intrinsics (N, 3, 3); sensor2ego (N, 4, 4) camera ->
        ego; ego2global (N, 4, 4) optional (per-camera ego poses; the model then aligns all cameras to camera 0's
        ego frame as the official). Returns tensors without a batch axis: pixel_values (N, 3, H, W), intrinsics,
        sensor2ego, img_aug (N, 3, 3), post_rots (N, 3, 3), post_trans (N, 3) [, ego2global]."""
        if not (len(images) == len(intrinsics) == len(sensor2ego)):
            raise ValueError(f"got {len(images)} images, {len(intrinsics)} intrinsics and {len(sensor2ego)} "
                             "sensor2ego; pass one of each per camera.")
        pixels, augs = [], []
        for img in images:
            img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8))
            img = img.convert("RGB")
            resize, dims, crop, flip, rotate = self.augmentation((img.height, img.width), train, rng)
            img = img.resize(dims, _RESAMPLE[self.resample]).crop(crop)
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if rotate:
                img = img.rotate(rotate)
            pixels.append(self.normalize(img))
            augs.append(self.augmentation_matrix(resize, crop, flip, rotate))
        img_aug = torch.tensor(np.stack(augs), dtype=torch.float32)
        post_rots = torch.zeros_like(img_aug)
        post_rots[:, :2, :2] = img_aug[:, :2, :2]
        post_rots[:, 2, 2] = 1
        post_trans = torch.zeros(len(augs), 3)
        post_trans[:, :2] = img_aug[:, :2, 2]
        out = {"pixel_values": torch.stack(pixels),
               "intrinsics": torch.as_tensor(np.asarray(intrinsics), dtype=torch.float32),
               "sensor2ego": torch.as_tensor(np.asarray(sensor2ego), dtype=torch.float32),
               "img_aug": img_aug, "post_rots": post_rots, "post_trans": post_trans}
        if ego2global is not None:
            out["ego2global"] = torch.as_tensor(np.asarray(ego2global), dtype=torch.float64)
        return out
