"""A cheap stand-in for torch-fidelity's Inception network, shared by the evaluation tests."""
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase


class StandInInception(FeatureExtractorBase):
    """Cheap stand-in for inception-v3-compat (its real weights need the internet): the same input
    contract (uint8, exactly 3 channels, any size) and feature names; features are a fixed random
    projection of the 8x8-pooled image, 64-d despite the name "2048" (FID's eigendecomposition of
    2048x2048 matrices costs seconds on a CPU)."""
    weights_paths = []

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        StandInInception.weights_paths.append(feature_extractor_weights_path)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 64, 64, generator=g) / 14)
        self.register_buffer("cls", torch.randn(64, 1008, generator=g) / 8)

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
