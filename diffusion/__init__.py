"""The torch side that both GPU workers share; nothing else in the platform imports torch.

- `checkpoints`: reading a user's single-file checkpoint safely and recognising its architecture;
- `components`: its UNet, VAE, text encoders, tokenizers and noise schedule, without a pipeline;
- `controlnets`: single-file ControlNets (original or diffusers layout), checked against the
  checkpoint's family;
- `layout`: the original (LDM/SGM) key layout of single-file checkpoints;
- `tokenizers`: the CLIP tokenizers, built offline; `configs`: the diffusers configs shipped;
- `images`: opening users' images with a bound on their pixels;
- `device`: the device a worker runs on;
- `testing`: random-weight tiny (and full-size) models written as real files, for tests and
  benchmarks.
"""
