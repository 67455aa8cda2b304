"""Silero VAD (v5/v6, 16 kHz) in plain PyTorch, batched: speech probabilities for every 32 ms frame.

The weights are those of the model the ``silero-vad`` package ships in its wheel and loads by
default (``silero_vad/data/silero_vad.jit``, MIT); the network is the package's own: per
512-sample frame, with the previous frame's last 64 samples as context, a learned STFT (a 256-tap
convolution), four 1-D convolutions, an LSTM cell carried from frame to frame, and a 1x1
convolution to a probability.

The package runs it one frame at a time through TorchScript (a Python-level step per 32 ms).
Here everything but the LSTM runs on all frames at once, batched (the front end sees one frame and
its context only), and the LSTM runs as one ``nn.LSTM`` call (cuDNN on a GPU) over the whole
sequence: the package's probabilities (to 1e-6; tests/models/test_silero_vad.py), at a fraction of
its cost. (Cutting a long file into pieces that run side by side does not give them: the LSTM's
state carries minutes of context, and a few seconds of warm-up change decisions.)
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

SAMPLE_RATE = 16000
FRAME = 512  # samples per probability (32 ms)
CONTEXT = 64  # samples of the previous frame seen with each frame
FRONT_BATCH = 8192  # frames per front-end pass (bounds its memory: ~25 MB of activations)


class SileroVAD(nn.Module):
    def __init__(self):
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def front(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, CONTEXT + FRAME] samples -> [N, 128] features (each frame on its own)."""
        x = nn.functional.pad(frames, (0, 64), mode="reflect").unsqueeze(1)
        x = self.stft_conv(x)
        x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = torch.relu(conv(x))
        return x.squeeze(-1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """[..., 128] LSTM outputs -> [...] probabilities."""
        w = self.final_conv.weight[:, :, 0]  # [1, 128]
        return torch.sigmoid(torch.relu(h) @ w.T + self.final_conv.bias).squeeze(-1)

    @torch.inference_mode()
    def probs(self, audio: torch.Tensor, state: VadState | None = None) -> torch.Tensor:
        """[samples] 16 kHz mono audio -> [ceil(samples / FRAME)] speech probabilities (on the CPU).

        ``state``: to run a long input piece by piece, exactly as in one go, pass the same
        :class:`VadState` with each piece; every piece but the last must be whole frames long."""
        device = self.stft_conv.weight.device
        audio = audio.to(device=device, dtype=torch.float32).flatten()
        n = -(-audio.numel() // FRAME)
        if n == 0:
            return torch.zeros(0)
        context = audio.new_zeros(CONTEXT) if state is None or state.context is None else state.context
        padded = torch.cat([context, audio, audio.new_zeros(n * FRAME - audio.numel())])
        frames = padded.unfold(0, CONTEXT + FRAME, FRAME)  # [n, 576], a view
        feats = torch.cat([self.front(frames[i : i + FRONT_BATCH]) for i in range(0, n, FRONT_BATCH)])
        # one pass over the whole sequence, as the package runs it frame after frame
        out, hidden = self.lstm(feats[None], None if state is None else state.hidden)
        if state is not None:
            state.context, state.hidden = padded[-CONTEXT:].clone(), hidden
        return self.head(out[0]).float().cpu()


class VadState:
    """What carries from one piece of an input to the next: the last samples and the LSTM state."""

    def __init__(self):
        self.context: torch.Tensor | None = None
        self.hidden: tuple[torch.Tensor, torch.Tensor] | None = None


def _package_model():
    """The TorchScript model of the installed ``silero-vad`` package (its default model)."""
    threads = torch.get_num_threads()  # importing silero_vad sets torch's threads to 1
    try:
        import silero_vad
    except ImportError:
        raise RuntimeError(
            "--vad needs the silero-vad package (pip install silero-vad); it ships the model's weights"
        ) from None
    finally:
        torch.set_num_threads(threads)
    path = os.path.join(os.path.dirname(silero_vad.__file__), "data", "silero_vad.jit")
    return torch.jit.load(path, map_location="cpu")


# the package's TorchScript names -> ours
_NAMES = {"stft.forward_basis_buffer": "stft_conv.weight", "decoder.decoder.2.weight": "final_conv.weight",
          "decoder.decoder.2.bias": "final_conv.bias"}  # fmt: skip
_NAMES.update(
    {f"encoder.{i}.reparam_conv.{k}": f"conv{i + 1}.{k}" for i in range(4) for k in ("weight", "bias")}
)
_NAMES.update({f"decoder.rnn.{k}": f"lstm.{k}_l0" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})


@functools.lru_cache(maxsize=4)
def load_silero_vad(device: str = "cpu") -> SileroVAD:
    """The model with the weights of the installed ``silero-vad`` package's default (TorchScript)
    model, on ``device``."""
    weights = _package_model()._model.state_dict()  # the 16 kHz model
    model = SileroVAD()
    model.load_state_dict({_NAMES[k]: v for k, v in weights.items()})
    return model.eval().to(device)
