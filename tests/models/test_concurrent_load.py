import threading

import torch

from openft.models.load import load_model


def test_concurrent_loads_in_threads_get_real_weights(tiny_model_dir):
    """The server loads models from request threads and the engine thread at once;
    every load must come out whole (no meta tensors, identical weights)."""
    results, errors = [], []

    def load():
        try:
            results.append(load_model(str(tiny_model_dir)).model)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    ref = results[0].state_dict()
    for m in results:
        for name, p in m.state_dict().items():
            assert p.device.type != "meta", name
            torch.testing.assert_close(p, ref[name])
