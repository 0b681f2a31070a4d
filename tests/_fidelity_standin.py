"""A cheap stand-in for torch-fidelity's Inception network, shared by the evaluation tests."""
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase


class StandInInception(FeatureExtractorBase):
    """Cheap stand-in for inception-v3-compat (its real weights need the internet), with the contract
    of fidelity.INCEPTION_NETWORK: built as (name, features_list, state_dict=...), its state-dict
    shapes from expected_state_dict_shapes(). The same input contract as the real network (uint8,
    exactly 3 channels, any size) and feature names; features are a fixed random projection of the
    8x8-pooled image, 64-d despite the name "2048" (FID's eigendecomposition of 2048x2048 matrices
    costs seconds on a CPU). Its default weights are the seeded ones `save_weights` writes."""
    state_dicts = []  # what each instance was given

    def __init__(self, name, features_list, state_dict=None, **kwargs):
        super().__init__(name, features_list)
        StandInInception.state_dicts.append(state_dict)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 64, 64, generator=g) / 14)
        self.register_buffer("cls", torch.randn(64, 1008, generator=g) / 8)
        if state_dict is not None:
            self.load_state_dict(state_dict)

    @classmethod
    def expected_state_dict_shapes(cls):
        return {"proj": (3 * 64, 64), "cls": (64, 1008)}

    @classmethod
    def save_weights(cls, path, scale: float = 1.0):
        """A weights file for the stand-in: its seeded weights (times `scale`: other weights)."""
        net = cls("inception-v3-compat", ["2048"])
        cls.state_dicts.pop()
        torch.save({k: v * scale for k, v in net.state_dict().items()}, path)
        return path

    @staticmethod
    def get_provided_features_list():
        return "2048", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, (x.dtype, x.shape)
        h = torch.tanh(torch.nn.functional.adaptive_avg_pool2d(x.float() / 128 - 1, 8).flatten(1) @ self.proj)
        out = {"2048": h, "logits_unbiased": h @ self.cls}
        return tuple(out[n] for n in self.features_list)
