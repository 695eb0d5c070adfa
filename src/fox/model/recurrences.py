"""The linear recurrences of the FoX paper's recurrent baselines, in PyTorch, and fla's kernels on CUDA.

Shape suffixes: B batch, T time, H heads, K key dim, V value dim, N chunks, C chunk length. Every recurrence
keeps a (K, V) state per head, S_t, and reads it with the query, o_t = scale * q_t S_t:

    simple GLA (Mamba-2's SSD)  S_t = exp(g_t) S_{t-1} + k_t^T v_t              g_t (B, T, H): one decay per head
    GLA (HGRN2)                 S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        g_t (B, T, H, K): one per key dim
    delta rule (DeltaNet)       S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1})  beta_t (B, T, H) in (0, 1)

Each has three forms: a step (one token: the decode path, and, looped, the fp64 definition the tests compare
with), a chunked PyTorch form (the CPU training path: exact attention-like products inside chunks of C tokens,
the state carried from chunk to chunk), and flash-linear-attention's chunked Triton kernels, which the public
functions call for bf16/fp16 CUDA tensors of more than one token (the rule fox_kernels follows for its own
kernels). fla's entry points are marked torch.compiler.disable: a compiled block breaks its graph around them.
States are fp32 (fp64 for fp64 inputs); outputs take v's dtype.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

CHUNK = 64
"""Chunk length of the PyTorch forms (fla's kernels choose their own)."""
GLA_CHUNK = 16
"""GLA's chunks are shorter: its in-chunk products hold one (C, C, K) tensor of decays per chunk and head."""

FLA_INSTALLED = importlib.util.find_spec("fla") is not None
"""Looked up once: a constant to torch.compile, where the dispatch below runs inside compiled blocks."""
TILELANG_INSTALLED = importlib.util.find_spec("tilelang") is not None
"""fla's other backend, which it takes where its Triton kernel for simple GLA's backward is wrong."""

Result = tuple[torch.Tensor, torch.Tensor | None]


def _use_fla(q: torch.Tensor) -> bool:
    """fla's kernels for 16-bit CUDA tensors of more than one token; PyTorch for the rest (CPU, fp32, fp64 and
    single-token decoding, where the step form is cheaper than a kernel launch per chunk)."""
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[1] > 1):
        return False
    if not FLA_INSTALLED:
        raise ModuleNotFoundError("the recurrent baselines (mamba2, hgrn2, deltanet) run on CUDA through "
                                  "flash-linear-attention's kernels: pip install -e '.[fla]'", name="fla")
    return True


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _initial(initial_state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, _, H, K = q.shape
    if initial_state is not None:
        return initial_state.to(_compute_dtype(q))
    return q.new_zeros(B, H, K, v.shape[-1], dtype=_compute_dtype(q))


# ---- steps: one token ----

def simple_gla_step(q_BHK, k_BHK, v_BHV, g_BH, scale: float, state_BHKV):
    state_BHKV = state_BHKV * g_BH.exp()[..., None, None] + k_BHK[..., :, None] * v_BHV[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q_BHK, state_BHKV), state_BHKV


def gla_step(q_BHK, k_BHK, v_BHV, g_BHK, scale: float, state_BHKV):
    state_BHKV = state_BHKV * g_BHK.exp()[..., None] + k_BHK[..., :, None] * v_BHV[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q_BHK, state_BHKV), state_BHKV


def delta_rule_step(q_BHK, k_BHK, v_BHV, beta_BH, scale: float, state_BHKV):
    predicted_BHV = torch.einsum("bhk,bhkv->bhv", k_BHK, state_BHKV)
    update_BHV = beta_BH[..., None] * (v_BHV - predicted_BHV)
    state_BHKV = state_BHKV + k_BHK[..., :, None] * update_BHV[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q_BHK, state_BHKV), state_BHKV


def run_steps(step: Callable, q, k, v, gate, scale: float, initial_state: torch.Tensor | None = None) -> Result:
    """The recurrence token by token: (o (B, T, H, V), final state). Slow; the definition the tests use."""
    dtype = _compute_dtype(q)
    state = _initial(initial_state, q, v)
    outputs = []
    for t in range(q.shape[1]):
        o, state = step(q[:, t].to(dtype), k[:, t].to(dtype), v[:, t].to(dtype), gate[:, t].to(dtype), scale,
                        state)
        outputs.append(o)
    return torch.stack(outputs, dim=1).to(v.dtype), state


def _one_step(step: Callable, q, k, v, gate, scale: float, initial_state, output_final_state: bool) -> Result:
    o, state = run_steps(step, q, k, v, gate, scale, initial_state)
    return o, state if output_final_state else None


# ---- chunked PyTorch forms ----

def _chunks(x_BTHD: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H, D) -> (B, H, N, C, D), zero-padded to whole chunks: a padded token has k = 0 and, with g = 0
    and beta = 0, leaves the state as it was."""
    B, T, H, D = x_BTHD.shape
    x_BTHD = F.pad(x_BTHD.to(dtype), (0, 0, 0, 0, 0, (-T) % chunk))
    return x_BTHD.view(B, -1, chunk, H, D).permute(0, 3, 1, 2, 4)


def _unchunk(o_BHNCV: torch.Tensor, T: int) -> torch.Tensor:
    B, H, N, C, V = o_BHNCV.shape
    return o_BHNCV.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]


def _causal(C: int, device: torch.device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(diagonal)


def simple_gla_chunked(q, k, v, g_BTH, scale: float, initial_state=None, output_final_state=False,
                       chunk: int = CHUNK) -> Result:
    """Within a chunk, with G the cumulative log decay from its start: o_t = sum_{s<=t} q_t.k_s exp(G_t - G_s)
    v_s + q_t exp(G_t) S_0; the state leaves the chunk as exp(G_C) S_0 + sum_s exp(G_C - G_s) k_s^T v_s."""
    T, dtype = q.shape[1], _compute_dtype(q)
    q_BHNCK, k_BHNCK, v_BHNCV = (_chunks(x, chunk, dtype) for x in (q * scale, k, v))
    G_BHNC = _chunks(g_BTH[..., None], chunk, dtype)[..., 0].cumsum(dim=-1)
    decay_BHNCC = (G_BHNC[..., :, None] - G_BHNC[..., None, :]).masked_fill(~_causal(chunk, q.device), -torch.inf)
    o_BHNCV = (q_BHNCK @ k_BHNCK.transpose(-1, -2) * decay_BHNCC.exp()) @ v_BHNCV
    q_BHNCK = q_BHNCK * G_BHNC.exp()[..., None]                             # reads S_0 decayed to t
    k_BHNCK = k_BHNCK * (G_BHNC[..., -1:] - G_BHNC).exp()[..., None]        # writes decayed to the chunk's end
    state = _initial(initial_state, q, v)
    outputs = []
    for n in range(q_BHNCK.shape[2]):
        outputs.append(o_BHNCV[:, :, n] + q_BHNCK[:, :, n] @ state)
        state = state * G_BHNC[:, :, n, -1].exp()[..., None, None] + k_BHNCK[:, :, n].transpose(-1, -2) @ \
            v_BHNCV[:, :, n]
    o = _unchunk(torch.stack(outputs, dim=2), T).to(v.dtype)
    return o, state if output_final_state else None


def gla_chunked(q, k, v, g_BTHK, scale: float, initial_state=None, output_final_state=False,
                chunk: int = GLA_CHUNK) -> Result:
    """simple_gla_chunked with a decay per key dim: the in-chunk weights sum_k q_tk k_sk exp(G_tk - G_sk) are
    formed pairwise, so no exp of a growing cumulative decay is ever divided out."""
    T, dtype = q.shape[1], _compute_dtype(q)
    q_BHNCK, k_BHNCK, v_BHNCV, G_BHNCK = (_chunks(x, chunk, dtype) for x in (q * scale, k, v, g_BTHK))
    G_BHNCK = G_BHNCK.cumsum(dim=-2)
    decay_BHNCCK = G_BHNCK[..., :, None, :] - G_BHNCK[..., None, :, :]
    decay_BHNCCK = decay_BHNCCK.masked_fill(~_causal(chunk, q.device)[..., None], -torch.inf).exp()
    scores_BHNCC = torch.einsum("bhntk,bhnsk,bhntsk->bhnts", q_BHNCK, k_BHNCK, decay_BHNCCK)
    o_BHNCV = scores_BHNCC @ v_BHNCV
    q_BHNCK = q_BHNCK * G_BHNCK.exp()
    k_BHNCK = k_BHNCK * (G_BHNCK[..., -1:, :] - G_BHNCK).exp()
    state = _initial(initial_state, q, v)
    outputs = []
    for n in range(q_BHNCK.shape[2]):
        outputs.append(o_BHNCV[:, :, n] + q_BHNCK[:, :, n] @ state)
        state = state * G_BHNCK[:, :, n, -1].exp()[..., None] + k_BHNCK[:, :, n].transpose(-1, -2) @ \
            v_BHNCV[:, :, n]
    o = _unchunk(torch.stack(outputs, dim=2), T).to(v.dtype)
    return o, state if output_final_state else None


def delta_rule_chunked(q, k, v, beta_BTH, scale: float, initial_state=None, output_final_state=False,
                       chunk: int = CHUNK) -> Result:
    """The WY form. Inside a chunk the updates u_t = beta_t (v_t - k_t S_{t-1}) satisfy
    u_t + beta_t sum_{s<t} (k_t.k_s) u_s = beta_t (v_t - k_t S_0), a unit lower-triangular system:
    U = W' - W S_0 with W = L^-1 diag(beta) K, W' = L^-1 diag(beta) V. Then o = Q S_0 + tril(Q K^T) U and the
    state leaves as S_0 + K^T U."""
    T, dtype = q.shape[1], _compute_dtype(q)
    q_BHNCK, k_BHNCK, v_BHNCV = (_chunks(x, chunk, dtype) for x in (q * scale, k, v))
    beta_BHNC1 = _chunks(beta_BTH[..., None], chunk, dtype)
    strictly_lower = _causal(chunk, q.device, diagonal=-1)
    L_BHNCC = (beta_BHNC1 * k_BHNCK @ k_BHNCK.transpose(-1, -2)).masked_fill(~strictly_lower, 0.0)
    w_BHNCK = torch.linalg.solve_triangular(L_BHNCC, beta_BHNC1 * k_BHNCK, upper=False, unitriangular=True)
    u_BHNCV = torch.linalg.solve_triangular(L_BHNCC, beta_BHNC1 * v_BHNCV, upper=False, unitriangular=True)
    scores_BHNCC = (q_BHNCK @ k_BHNCK.transpose(-1, -2)).masked_fill(~_causal(chunk, q.device), 0.0)
    state = _initial(initial_state, q, v)
    outputs = []
    for n in range(q_BHNCK.shape[2]):
        update_BHCV = u_BHNCV[:, :, n] - w_BHNCK[:, :, n] @ state
        outputs.append(q_BHNCK[:, :, n] @ state + scores_BHNCC[:, :, n] @ update_BHCV)
        state = state + k_BHNCK[:, :, n].transpose(-1, -2) @ update_BHCV
    o = _unchunk(torch.stack(outputs, dim=2), T).to(v.dtype)
    return o, state if output_final_state else None


# ---- public entry points ----

def fla_refuses_simple_gla_backward() -> bool:
    """fla 0.6 raises in chunk_simple_gla's backward on Hopper under Triton 3.4 to 3.7.0 (that compiler gets the
    kernel wrong there, fla issue #640) unless tilelang is installed; GLA's chunked kernels do not use it.
    Plain constants, so that torch.compile traces this like _use_fla."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    return IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1 and not TILELANG_INSTALLED


def _fla_simple_gla(q, k, v, g_BTH, scale: float, initial_state, output_final_state: bool) -> Result:
    """fla's chunk_simple_gla or, where fla refuses its backward, chunk_gla with the decay repeated over the
    key dims: the same recurrence exactly, so Mamba-2 trains there at GLA's speed."""
    if fla_refuses_simple_gla_backward():
        from fla.ops.gla import chunk_gla

        g_BTHK = g_BTH[..., None].expand(*g_BTH.shape, q.shape[-1]).contiguous()
        return chunk_gla(q, k, v, g_BTHK, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state)
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g=g_BTH, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state)


def simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, scale: float,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False) -> Result:
    """q, k (B, T, H, K), v (B, T, H, V), g (B, T, H) log decay (<= 0, fp32), initial_state (B, H, K, V) fp32.
    Returns o (B, T, H, V) and, with output_final_state, the state after the last token."""
    if _use_fla(q):
        return _fla_simple_gla(q, k, v, g.float(), scale, initial_state, output_final_state)
    if q.shape[1] == 1:
        return _one_step(simple_gla_step, q, k, v, g, scale, initial_state, output_final_state)
    return simple_gla_chunked(q, k, v, g, scale, initial_state, output_final_state)


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, scale: float,
        initial_state: torch.Tensor | None = None, output_final_state: bool = False) -> Result:
    """As simple_gla with g (B, T, H, K): a log decay per key dim."""
    if _use_fla(q):
        from fla.ops.gla import chunk_gla

        return chunk_gla(q, k, v, g.float(), scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state)
    if q.shape[1] == 1:
        return _one_step(gla_step, q, k, v, g, scale, initial_state, output_final_state)
    return gla_chunked(q, k, v, g, scale, initial_state, output_final_state)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, scale: float,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False) -> Result:
    """As simple_gla with the delta rule's beta (B, T, H) in place of a decay; k should be L2-normalised (the
    state then stays bounded)."""
    if _use_fla(q):
        from fla.ops.delta_rule import chunk_delta_rule

        return chunk_delta_rule(q, k, v, beta, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state)
    if q.shape[1] == 1:
        return _one_step(delta_rule_step, q, k, v, beta, scale, initial_state, output_final_state)
    return delta_rule_chunked(q, k, v, beta, scale, initial_state, output_final_state)
