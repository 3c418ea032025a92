"""Stage 3 from a stage-2 checkpoint with the distillation term (`train_spatial_distill`) on every decoder layer's
output instead of the last hidden state alone (an experiment-only patch: forward hooks on the LLM's layers record
the spatial pass and the teacher pass; the term averages the relative MSE at the query position and on the image
tokens over the layers).

    python notes/experiments/distill_layers.py GLAMM_INIT_MODEL PROFILE VARIANT SEED OUT

The arguments are those of `stage3_from.py`; PROFILE must set `model: {train_spatial_distill: W}`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import ppcr.model.modeling_ppcr as modeling  # noqa: E402
from ppcr.losses import relative_mse  # noqa: E402
from ppcr.model.mllm import MultimodalLLM, image_token_states  # noqa: E402

CAPTURE: dict = {"on": None, "layers": [], "student": None, "teacher": None}


def _hook(module, args, output):
    if CAPTURE["on"] is not None:
        CAPTURE["layers"].append(output[0] if isinstance(output, tuple) else output)


def _wrap(method, role, only_branch=None):
    def wrapped(self, *args, **kwargs):
        if not getattr(self, "_layer_hooks", False):
            for layer in self.llava.model.language_model.layers:
                layer.register_forward_hook(_hook)
            self._layer_hooks = True
        branch = args[0] if only_branch else None
        capture = self.training and (only_branch is None or branch == only_branch)
        CAPTURE["on"], CAPTURE["layers"] = (role if capture else None), []
        out = method(self, *args, **kwargs)
        if capture:
            encoded = args[1] if only_branch else args[0]
            CAPTURE[role] = (list(CAPTURE["layers"]), encoded, self.image_token_id)
        CAPTURE["on"], CAPTURE["layers"] = None, []
        return out
    return wrapped


def layered_distillation(query, image, t_query, t_image):
    (s_layers, s_enc, image_id), (t_layers, t_enc, _) = CAPTURE["student"], CAPTURE["teacher"]
    terms = []
    for s, t in zip(s_layers, t_layers):
        rows = s_enc.query_index.new_tensor(range(s.shape[0]))
        terms.append(relative_mse(s[rows, s_enc.query_index], t[rows, t_enc.query_index]))
        terms.append(relative_mse(image_token_states(s, s_enc.input_ids, image_id),
                                  image_token_states(t, t_enc.input_ids, image_id)))
    return sum(terms) / len(terms)


if __name__ == "__main__":
    MultimodalLLM.run_branch = _wrap(MultimodalLLM.run_branch, "student", only_branch="spatial")
    MultimodalLLM.run_base = _wrap(MultimodalLLM.run_base, "teacher")
    modeling.spatial_distillation = layered_distillation
    import stage3_from  # noqa: E402

    stage3_from.main(*sys.argv[1:])
