"""The orthogonalised optimisers' update rules as their official code writes them, re-typed
here one matrix at a time in plain torch (no ortho_run import), for the tests to compare with.

Each ``*_step(params, grads_per_step, ...)`` runs the whole optimiser over several steps and
returns the final weights. Newton–Schulz runs in the dtype given (the official code's bf16 is
replaced by float32/float64 where a test compares to 1e-6). The first functions pass a
convolution weight to the official code as its flattened out × (in·k·k) matrix
(``optim.conv_shape=matrix``); the ``*_as_written`` ones at the end take it as it is, as the
official code is written (``optim.conv_shape=kernel``).
"""

import math

import torch

MUON = (3.4445, -4.7750, 2.0315)


def _ns(g, steps, coeffs=MUON, dtype=torch.float32, additive=True, eps=1e-7):
    """KellerJordan/Muon ``zeropower_via_newtonschulz5`` (X / (‖X‖ + eps)); with
    ``additive=False`` torch.optim.Muon's X / max(‖X‖, eps)."""
    a, b, c = coeffs
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    n = x.norm()
    x = x / (n + eps) if additive else x / n.clamp(min=eps)
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if tall else x


def _run(params, grads, update):
    ps = [p.clone() for p in params]
    states = [{} for _ in ps]
    for step_grads in grads:
        for p, g, st in zip(ps, step_grads, states):
            update(p, g.clone(), st)
    return ps


def muon_step(params, grads, lr=0.02, beta=0.95, wd=0.0, nesterov=True, dtype=torch.float32):
    """KellerJordan/Muon ``muon_update`` + ``Muon.step`` (torch.optim.Muon's clamp form)."""
    def update(p, g, st):
        buf = st.setdefault("m", torch.zeros_like(g))
        buf.lerp_(g, 1 - beta)
        u = g.lerp_(buf, beta) if nesterov else buf
        m = u.reshape(u.shape[0], -1)
        o = _ns(m, 5, dtype=dtype, additive=False)
        o = o * max(1, m.size(-2) / m.size(-1)) ** 0.5
        p.mul_(1 - lr * wd)
        p.add_(o.reshape(p.shape).to(p.dtype), alpha=-lr)
    return _run(params, grads, update)


def normuon_step(params, grads, lr=0.02, beta=0.95, beta2=0.95, wd=0.0, dtype=torch.float32):
    """zichongli5/NorMuon ``normuon_update`` + ``SingleDeviceNorMuon.step`` (Nesterov), each
    weight handed over as its flattened matrix (the code as written is below)."""
    def flat(t):
        return t.reshape(t.shape[0], -1)

    out = normuon_step_as_written([flat(p) for p in params],
                                  [[flat(g) for g in step] for step in grads],
                                  lr=lr, beta=beta, beta2=beta2, wd=wd, dtype=dtype)
    return [o.reshape(p.shape) for o, p in zip(out, params)]


def simple_quantile(t, q):
    """huawei-noah ROOT ``simple_quantile``."""
    t = t.flatten()
    n = t.numel()
    index = torch.tensor(q * (n - 1))
    lo, hi = torch.floor(index).long(), torch.ceil(index).long()
    if lo == hi:
        return t.kthvalue(int(lo) + 1).values
    lower, upper = t.kthvalue(int(lo) + 1).values, t.kthvalue(int(hi) + 1).values
    return torch.lerp(lower, upper, index - lo)


def root_step(params, grads, lr=0.02, momentum=0.95, wd=0.1, nesterov=True, steps=5,
              table=None):
    """huawei-noah ROOT (``examples/example_train.py``): sum momentum, Nesterov, the 0.9 quantile
    split, ``root5`` in the gradient's dtype with coefficients keyed (min, max), Moonlight's
    0.2·√max(A, B) scale, weight decay with the unscaled lr."""
    table = table or {}

    def root5(G):  # its Newton–Schulz: X / (‖X‖ + 1e-7), in G's dtype, a per-shape triple
        rows, cols = G.shape
        coeffs = table.get((min(rows, cols), max(rows, cols)), MUON)
        return _ns(G, steps, coeffs, dtype=G.dtype, additive=True)

    def update(p, g, st):
        g = g.view(g.size(0), -1)
        buf = st.setdefault("m", torch.zeros_like(g))
        buf.mul_(momentum).add_(g)
        g = g.add(buf, alpha=momentum) if nesterov else buf
        eps = simple_quantile(g.abs().float(), 0.9) + 1e-9
        o = torch.sign(g) * torch.nn.functional.relu(torch.abs(g) - eps)
        u = root5(g - o)
        rows, cols = g.shape
        p.mul_(1 - lr * wd)
        p.add_(u.reshape(p.shape), alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))
    return _run(params, grads, update)


def auon_package_step(params, grads, lr=0.24, momentum=0.95, wd=0.0, gamma=1.5):
    """ryyzn9/AuON ``auon/optimizer.py`` ``AuON.step``: EMA momentum, the Nesterov blend
    G ← lerp(G, M, μ), then U = G / (sqrt(mean(cosh(γ·G/(‖G‖ + 1e-7))²)) + 1e-8) over the whole
    tensor (a zero G skips the step), no aspect-ratio factor, in the gradient's dtype."""
    def update(p, g, st):
        g = g.clone()
        m = st.setdefault("m", torch.zeros_like(g))
        if wd != 0:
            p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - momentum)
        G = g.lerp_(m, momentum)
        g_norm = G.norm()
        if g_norm == 0:
            return
        scaled = G / (g_norm + 1e-7) * gamma
        r = torch.sqrt(torch.mean(torch.cosh(scaled) ** 2))
        p.add_(G / (r + 1e-8), alpha=-lr)
    return _run(params, grads, update)


def hybrid_auon_package_step(params, grads, lr=0.24, momentum=0.95, wd=0.0, gamma=1.5,
                             ns_steps=5):
    """ryyzn9/AuON ``HybridAuON.step`` (on the flattened matrix of a convolution)."""
    a, b, c = MUON

    def update(p, g, st):
        g = g.reshape(g.shape[0], -1)
        m = st.setdefault("m", torch.zeros_like(g))
        if wd:
            p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - momentum)
        G = g.lerp_(m, momentum)
        X = G
        tall = X.size(-2) > X.size(-1)
        if tall:
            X = X.mT
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        for _ in range(ns_steps):
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
        G = X.mT if tall else X
        scaled = G / (G.norm() + 1e-7) * gamma
        r = torch.sqrt(torch.mean(torch.cosh(scaled) ** 2))
        p.add_((G / (r + 1e-8)).reshape(p.shape), alpha=-lr)
    return _run(params, grads, update)


def srip_penalty(w, b):
    """VITA-Group/Orthogonality-in-CNNs ``l2_reg_ortho`` for one weight: the smaller Gram
    matrix minus I, one power step from ``b`` (the code draws it with ``torch.rand``), the
    squared norm of the result."""
    w1 = w.reshape(w.shape[0], -1)
    rows, cols = w1.shape
    m = w1.T @ w1 if rows > cols else w1 @ w1.T
    w_tmp = m - torch.eye(m.shape[0], dtype=w.dtype)
    v1 = w_tmp @ b
    v2 = v1 / torch.norm(v1, 2)
    v3 = w_tmp @ v2
    return torch.norm(v3, 2) ** 2


def srip_ortho_decay(epoch, od=1e-2):
    """VITA-Group/Orthogonality-in-CNNs ``Wide-Resnet/train_n.py``: the SRIP coefficient of
    (0-based) epoch ``epoch``, which the loop asks as ``adjust_ortho_decay_rate(epoch + 1)``
    with ``--ortho-decay`` 1e-2."""
    epoch = epoch + 1
    if epoch > 120:
        return 0.0
    if epoch > 70:
        return 1e-6 * od
    if epoch > 50:
        return 1e-4 * od
    if epoch > 20:
        return 1e-3 * od
    return od


def ocnn_orth_dist(mat):
    """samaonline/Orthogonal-Convolutional-Neural-Networks ``imagenet/utils.py`` ``orth_dist``
    (what its training script applies to the 1×1 shortcut convolutions): the weight as a matrix,
    turned so its Gram matrix is the smaller one, ‖G − I‖_F unsquared."""
    mat = mat.reshape(mat.shape[0], -1)
    if mat.shape[0] < mat.shape[1]:
        mat = mat.T
    return torch.norm(mat.T @ mat - torch.eye(mat.shape[1], dtype=mat.dtype))


def ocnn_deconv_orth_dist(kernel, stride, padding):
    """The same file's ``deconv_orth_dist`` (for the k×k convolutions): ‖conv2d(K, K, stride,
    padding) − I_r0‖_F, I_r0 the identity over channel pairs at the centre. The code's padding is
    1 whatever the stride; the tests pass the paper's ⌊(k − 1)/S⌋·S."""
    o_c = kernel.shape[0]
    output = torch.conv2d(kernel, kernel, stride=stride, padding=padding)
    target = torch.zeros((o_c, o_c, output.shape[-2], output.shape[-1]), dtype=kernel.dtype)
    ct = output.shape[-1] // 2
    target[:, :, ct, ct] = torch.eye(o_c, dtype=kernel.dtype)
    return torch.norm(output - target)


def _paper_auon_like(params, grads, lr, momentum, direction):
    def update(p, g, st):
        g = g.reshape(g.shape[0], -1)
        m = st.setdefault("m", torch.zeros_like(g))
        m.lerp_(g, 1 - momentum)
        u = direction(g.lerp(m, momentum))
        p.add_(u.reshape(p.shape).to(p.dtype), alpha=-lr * max(1, g.size(0) / g.size(1)) ** 0.5)
    return _run(params, grads, update)


def auon_paper_step(params, grads, lr=0.02, momentum=0.95, dtype=None):
    """The AuON paper's equations (§3.1) as its training script (ryyzn9/AuON
    ``Auon_Adam_train.py``, ``zeropower_via_newtonschulz5`` + ``auon.step``) computes them:
    X = M / (‖M‖ + 1e-7), U = X / (rms(cosh X) + 1e-8), in bf16 there (``dtype``: the
    gradient's when None), scale √max(1, rows/cols)."""
    def direction(m):
        x = m.to(dtype or m.dtype)
        x = x / (x.norm() + 1e-7)
        rms = torch.sqrt(torch.mean(torch.cosh(x).square()))
        return x * 1 / (rms + 1e-8)
    return _paper_auon_like(params, grads, lr, momentum, direction)


def hybrid_auon_paper_step(params, grads, lr=0.02, momentum=0.95, ns_steps=1,
                           dtype=torch.float32):
    """The AuON paper's hybrid (§3.2): one Newton–Schulz step (K. Jordan's, from
    X / (‖X‖ + 1e-7), as the paper's script), then X / (rms(cosh X) + 1e-8)."""
    def direction(m):
        x = _ns(m, ns_steps, dtype=dtype, additive=True).to(m.dtype)
        return x / (torch.sqrt(torch.mean(torch.cosh(x) ** 2)) + 1e-8)
    return _paper_auon_like(params, grads, lr, momentum, direction)


def airbench_muon_step(params, grads, lr=0.24, momentum=0.6, steps=3, dtype=torch.float32):
    """KellerJordan/cifar10-airbench ``airbench94_muon.py`` ``Muon.step``: sum momentum,
    Nesterov, the weight renormalised to Frobenius norm √out, then three Newton–Schulz steps
    (X /= ‖X‖ + eps first) of the flattened update, no shape scale."""
    a, b, c = MUON

    def zeropower(G, eps=1e-7):
        X = G.to(dtype)
        X = X / (X.norm() + eps)
        if G.size(0) > G.size(1):
            X = X.T
        for _ in range(steps):
            A = X @ X.T
            B = b * A + c * A @ A
            X = a * X + B @ X
        if G.size(0) > G.size(1):
            X = X.T
        return X

    def update(p, g, st):
        buf = st.setdefault("m", torch.zeros_like(g))
        buf.mul_(momentum).add_(g)
        g = g.add(buf, alpha=momentum)
        p.mul_(len(p) ** 0.5 / p.norm())
        p.add_(zeropower(g.reshape(len(g), -1)).view(g.shape).to(p.dtype), alpha=-lr)
    return _run(params, grads, update)


# ------------------------------------------------ the official code on a weight as it is
# The functions above pass a convolution to the official code as its flattened matrix. These
# take the weight as it is, 4-D kernels included, as the official code is written (what
# ``optim.conv_shape=kernel`` follows): K. Jordan's ``muon_update`` flattens only for Newton–
# Schulz and reads the scale from the 4-D gradient's last two dims; NorMuon's row statistics and
# norm run on the 4-D update; HybridAuON orthogonalises each k×k slice; the AuON script reads the
# scale from the parameter's last two dims.

def _ns_batched(X, steps, coeffs=MUON, dtype=torch.float32, eps=1e-7):
    """K. Jordan's ``zeropower_via_newtonschulz5`` on a tensor of any ndim ≥ 2 (batched over
    the leading dims), in ``dtype`` instead of bf16."""
    a, b, c = coeffs
    X = X.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def kj_muon_step_as_written(params, grads, lr=0.02, beta=0.95, wd=0.0, nesterov=True,
                            dtype=torch.float32):
    """KellerJordan/Muon ``muon_update`` + ``SingleDeviceMuon.step``, a 4-D weight as it is."""
    def update(p, g, st):
        buf = st.setdefault("m", torch.zeros_like(g))
        buf.lerp_(g, 1 - beta)
        u = g.lerp_(buf, beta) if nesterov else buf
        if u.ndim == 4:
            u = u.view(len(u), -1)
        u = _ns_batched(u, 5, dtype=dtype)
        u = u * max(1, g.size(-2) / g.size(-1)) ** 0.5
        p.mul_(1 - lr * wd)
        p.add_(u.reshape(p.shape).to(p.dtype), alpha=-lr)
    return _run(params, grads, update)


def normuon_step_as_written(params, grads, lr=0.02, beta=0.95, beta2=0.95, wd=0.0,
                            dtype=torch.float32):
    """zichongli5/NorMuon ``normuon_update`` + ``SingleDeviceNorMuon.step``, a 4-D weight as
    it is (the update in float32 where the official code keeps bf16)."""
    def update(p, g, st):
        buf = st.setdefault("m", torch.zeros_like(p))
        sm = st.setdefault("v", torch.zeros_like(p[..., 0:1], dtype=torch.float32))
        buf.lerp_(g, 1 - beta)
        u = g.lerp_(buf, beta)
        shape = None
        if u.ndim == 4:
            shape = u.shape
            u = u.reshape(u.size(0), -1)
        u = _ns_batched(u, 5, dtype=dtype).float()
        if shape is not None:
            u = u.reshape(shape)
        vnorm = u.norm(dim=(-2, -1), keepdim=True)
        sm.lerp_(torch.mean(u * u, dim=-1, keepdim=True), 1 - beta2)
        u = u * (1 / sm.sqrt().add(1e-10))
        u = u * (vnorm / u.norm(dim=(-2, -1), keepdim=True).add(1e-10))
        u = u * max(1, g.size(-2) / g.size(-1)) ** 0.5
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(u.reshape(p.shape).to(p.dtype), alpha=-lr)
    return _run(params, grads, update)


def hybrid_auon_package_step_as_written(params, grads, lr=0.24, momentum=0.95, wd=0.0,
                                        gamma=1.5, ns_steps=5):
    """ryyzn9/AuON ``HybridAuON.step``, a 4-D weight as it is (Newton–Schulz per k×k slice,
    the brake by the whole weight's norm)."""
    def update(p, g, st):
        m = st.setdefault("m", torch.zeros_like(g))
        if wd:
            p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - momentum)
        G = _ns_batched(g.lerp_(m, momentum), ns_steps, dtype=g.dtype)
        r = torch.sqrt(torch.mean(torch.cosh(G / (G.norm() + 1e-7) * gamma) ** 2))
        p.add_(G / (r + 1e-8), alpha=-lr)
    return _run(params, grads, update)


def auon_script_step_as_written(params, grads, lr=0.02, momentum=0.95, dtype=None):
    """ryyzn9/AuON ``Auon_Adam_train.py`` ``auon.step``: the scale from the parameter's last two
    dims."""
    def update(p, g, st):
        buf = st.setdefault("m", torch.zeros_like(g))
        buf.lerp_(g, 1 - momentum)
        x = g.lerp_(buf, momentum).to(dtype or g.dtype)
        x = x / (x.norm() + 1e-7)
        u = x * 1 / (torch.sqrt(torch.mean(torch.cosh(x).square())) + 1e-8)
        p.add_(u.reshape(p.shape).to(p.dtype), alpha=-lr * max(1, p.size(-2) / p.size(-1)) ** 0.5)
    return _run(params, grads, update)
