"""A custom trigger from files: x' = (1 - m) * x + m * t, with a trigger image t and a
mask m in [0, 1] (image / .npy files, resized to the input)."""
from __future__ import annotations

import torch

from unbackdoor.attacks.base import Attack, register
from unbackdoor.attacks.blended import load_trigger_image
from unbackdoor.core.errors import UnbackdoorError


@register
class CustomTrigger(Attack):
    name = "custom"

    def __init__(self, shape, num_classes, target=0, mode="all-to-one", seed=0, trigger: str = "", mask: str = "", _restoring: bool = False):
        super().__init__(shape, num_classes, target, mode, seed)

        self.trigger_path, self.mask_path = trigger, mask
        if _restoring:  # load_attack fills pattern/mask from attack.safetensors
            self.pattern = torch.zeros(self.shape)
            self.mask = torch.zeros(1, *self.shape[1:])
            return
        if not trigger or not mask:
            raise UnbackdoorError("the custom attack needs trigger=IMAGE and mask=IMAGE (e.g. --param trigger=t.png --param mask=m.png)")
        self.pattern = load_trigger_image(trigger, self.shape)
        self.mask = load_trigger_image(mask, (1, *self.shape[1:]))

    def apply(self, x, gen=None):
        m = self.mask.to(x)
        return (1 - m) * x + m * self.pattern.to(x)

    def params(self):
        return {"trigger": self.trigger_path, "mask": self.mask_path}

    def tensors(self):
        return {"pattern": self.pattern, "mask": self.mask}
