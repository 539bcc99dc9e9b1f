from services.inference import domain


def test_extras_and_rembg_jobs_need_no_stable_diffusion_checkpoint():
    for task in ("extra-single-image", "extra-batch-images", "rembg"):
        domain.check_runnable(task, {})
        domain.check_runnable(task, {"ESRGAN": ["4x-tiny.pth"]})


def test_extras_models_are_requested_by_their_type():
    assert domain.requested_models({"ESRGAN": ["4x.pth"], "rembg": ["u2net.onnx"], "VAE": ["Automatic"]}) == [
        ("ESRGAN", "4x.pth"),
        ("rembg", "u2net.onnx"),
    ]
