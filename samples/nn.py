"""Minimal numpy layers for training the sample models (no PyTorch).

Every layer keeps its trainable arrays in ``params`` and, after ``backward``,
the matching gradients in ``grads`` (same keys). Keys and array layouts follow
PyTorch/ONNX conventions (``weight`` [out, in] for dense layers, [out, in/groups,
kh, kw] for convolutions) so export is a direct copy. All math is float32.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

F32 = np.float32


class Layer:
    """Base layer: parameter dicts plus forward/backward."""

    decay_keys = ("weight",)  # parameters that receive L2 weight decay

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}

    def forward(self, x, train=False):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError


def _he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(F32)


class Dense(Layer):
    """y = x @ W.T + b with W stored [out, in] (ONNX Gemm transB=1)."""

    def __init__(self, n_in, n_out, rng):
        super().__init__()
        self.params = {"weight": _he(rng, (n_out, n_in), n_in), "bias": np.zeros(n_out, F32)}

    def forward(self, x, train=False):
        self.x = x
        return x @ self.params["weight"].T + self.params["bias"]

    def backward(self, dy):
        self.grads = {"weight": np.ascontiguousarray((self.x.T @ dy).T), "bias": dy.sum(0)}
        return dy @ self.params["weight"]


class Relu(Layer):
    def forward(self, x, train=False):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


class Flatten(Layer):
    """[N, ...] -> [N, prod(...)] (ONNX Flatten axis=1)."""

    def forward(self, x, train=False):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self.shape)


def _windows(x, k, stride):
    """View [N, C, H, W] as sliding k x k windows [N, C, Ho, Wo, k, k]."""
    return sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]


def _col2im(dwin, x_shape, stride):
    """Adjoint of ``_windows``: scatter-add window gradients [k, k, N, C, Ho, Wo] into x."""
    dwin = np.ascontiguousarray(dwin)
    dx = np.zeros(x_shape, dwin.dtype)
    k, ho, wo = dwin.shape[0], dwin.shape[4], dwin.shape[5]
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += dwin[i, j]
    return dx


class Conv2d(Layer):
    """2-D convolution via im2col + matmul; ``groups`` is 1 or in_ch (depthwise)."""

    def __init__(self, cin, cout, k, rng, stride=1, pad=0, groups=1):
        super().__init__()
        assert groups in (1, cin) and (groups == 1 or cout == cin)
        self.k, self.stride, self.pad, self.groups = k, stride, pad, groups
        fan_in = cin // groups * k * k
        self.params = {"weight": _he(rng, (cout, cin // groups, k, k), fan_in),
                       "bias": np.zeros(cout, F32)}

    def forward(self, x, train=False):
        p = self.pad
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        self.xp_shape = xp.shape
        win = _windows(xp, self.k, self.stride)
        w, b = self.params["weight"], self.params["bias"]
        n, c, ho, wo = win.shape[:4]
        if self.groups == 1:
            self.cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, -1)
            y = self.cols @ w.reshape(len(w), -1).T + b
            return y.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)
        # depthwise: one multiply-add of a strided input slice per kernel tap
        self.xp = xp
        y = np.empty((n, c, ho, wo), F32)
        y[:] = b[:, None, None]
        for i, j, tap in self._taps(xp, ho, wo):
            y += tap * w[:, 0, i, j][:, None, None]
        return y

    def _taps(self, xp, ho, wo):
        """(i, j, the input slice kernel tap (i, j) multiplies: xp[:, :, i + s * y, j + s * x])."""
        s = self.stride
        for i in range(self.k):
            for j in range(self.k):
                yield i, j, xp[:, :, i:i + s * ho:s, j:j + s * wo:s]

    def backward(self, dy):
        w = self.params["weight"]
        n, o, ho, wo = dy.shape
        k = self.k
        if self.groups == 1:
            dyf = dy.transpose(0, 2, 3, 1).reshape(-1, o)
            # (cols.T @ dyf).T: OpenBLAS is ~20x faster this way round than dyf.T @ cols
            self.grads = {"weight": (self.cols.T @ dyf).T.reshape(w.shape), "bias": dyf.sum(0)}
            dwin = (dyf @ w.reshape(o, -1)).reshape(n, ho, wo, -1, k, k).transpose(4, 5, 0, 3, 1, 2)
            dx = _col2im(dwin, self.xp_shape, self.stride)
        else:
            dw = np.empty_like(w)
            dx = np.zeros(self.xp_shape, F32)
            s = self.stride
            for i, j, tap in self._taps(self.xp, ho, wo):
                dw[:, 0, i, j] = np.einsum("nchw,nchw->c", dy, tap)
                dx[:, :, i:i + s * ho:s, j:j + s * wo:s] += dy * w[:, 0, i, j][:, None, None]
            self.grads = {"weight": dw, "bias": dy.sum((0, 2, 3))}
        p = self.pad
        return dx[:, :, p:dx.shape[2] - p, p:dx.shape[3] - p] if p else dx


class BatchNorm2d(Layer):
    """Batch normalization over (N, H, W); running stats for inference (momentum 0.1)."""

    decay_keys = ()

    def __init__(self, c, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.params = {"weight": np.ones(c, F32), "bias": np.zeros(c, F32)}
        self.buffers = {"running_mean": np.zeros(c, F32), "running_var": np.ones(c, F32)}

    def forward(self, x, train=False):
        g, b = self.params["weight"][:, None, None], self.params["bias"][:, None, None]
        if not train:
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
            return (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + self.eps) * g + b
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        m = self.momentum
        cnt = x.size / x.shape[1]
        self.buffers["running_mean"] = ((1 - m) * self.buffers["running_mean"] + m * mean).astype(F32)
        self.buffers["running_var"] = ((1 - m) * self.buffers["running_var"]
                                       + m * var * cnt / (cnt - 1)).astype(F32)
        self.inv = (1.0 / np.sqrt(var + self.eps))[:, None, None]
        self.xhat = (x - mean[:, None, None]) * self.inv
        return self.xhat * g + b

    def backward(self, dy):
        self.grads = {"weight": (dy * self.xhat).sum((0, 2, 3)), "bias": dy.sum((0, 2, 3))}
        dxhat = dy * self.params["weight"][:, None, None]
        mean_d = dxhat.mean((0, 2, 3), keepdims=True)
        mean_dx = (dxhat * self.xhat).mean((0, 2, 3), keepdims=True)
        return (dxhat - mean_d - self.xhat * mean_dx) * self.inv


class MaxPool2(Layer):
    """2x2 max pooling, stride 2 (H and W must be even)."""

    def forward(self, x, train=False):
        n, c, h, w = x.shape
        r = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
        self.arg, self.shape = r.argmax(-1), x.shape
        return np.take_along_axis(r, self.arg[..., None], -1)[..., 0]

    def backward(self, dy):
        n, c, h, w = self.shape
        d = np.zeros((n, c, h // 2, w // 2, 4), dy.dtype)
        np.put_along_axis(d, self.arg[..., None], dy[..., None], -1)
        return d.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(self.shape)


class GlobalAvgPool(Layer):
    """Mean over H, W -> [N, C, 1, 1] (ONNX GlobalAveragePool)."""

    def forward(self, x, train=False):
        self.shape = x.shape
        return x.mean((2, 3), keepdims=True)

    def backward(self, dy):
        return np.broadcast_to(dy, self.shape) / F32(self.shape[2] * self.shape[3])


class Sequential(Layer):
    """Named chain of layers: ``Sequential([("conv1", Conv2d(...)), ...])``."""

    def __init__(self, layers):
        super().__init__()
        self.layers = list(layers)

    def forward(self, x, train=False):
        for _, layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dy):
        for _, layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def named_layers(self, prefix=""):
        """Yield (dotted name, leaf layer) pairs, recursing into containers."""
        for name, layer in self.layers:
            full = f"{prefix}{name}"
            if isinstance(layer, (Sequential, Residual)):
                yield from layer.named_layers(full + ".")
            else:
                yield full, layer


class Residual(Sequential):
    """y = body(x) + x (the ONNX Add of a block input and its conv path)."""

    def forward(self, x, train=False):
        return super().forward(x, train) + x

    def backward(self, dy):
        return super().backward(dy) + dy


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class LSTM(Layer):
    """Single-layer unidirectional LSTM over [N, T, F]; returns the last hidden state [N, H].

    Parameters use ONNX layout and gate order (i, o, f, c):
    ``W`` [4H, F], ``R`` [4H, H], ``Wb`` and ``Rb`` [4H].
    """

    def __init__(self, n_in, hidden, rng):
        super().__init__()
        h = hidden
        s = 1.0 / np.sqrt(h)
        self.hidden = h
        rb = np.zeros(4 * h, F32)
        rb[2 * h:3 * h] = 1.0  # forget-gate bias 1
        self.params = {"W": rng.uniform(-s, s, (4 * h, n_in)).astype(F32),
                       "R": rng.uniform(-s, s, (4 * h, h)).astype(F32),
                       "Wb": np.zeros(4 * h, F32), "Rb": rb}

    decay_keys = ("W", "R")

    def forward(self, x, train=False):
        n, t, _ = x.shape
        h = self.hidden
        p = self.params
        xw = x @ p["W"].T + (p["Wb"] + p["Rb"])  # [N, T, 4H]
        hs, cs = [np.zeros((n, h), F32)], [np.zeros((n, h), F32)]
        self.cache = []
        for step in range(t):
            g = xw[:, step] + hs[-1] @ p["R"].T
            i, o, f = sigmoid(g[:, :h]), sigmoid(g[:, h:2 * h]), sigmoid(g[:, 2 * h:3 * h])
            cc = np.tanh(g[:, 3 * h:])
            c = f * cs[-1] + i * cc
            tc = np.tanh(c)
            hs.append(o * tc)
            cs.append(c)
            self.cache.append((i, o, f, cc, tc))
        self.x, self.hs, self.cs = x, hs, cs
        return hs[-1]

    def backward(self, dy):
        p, h = self.params, self.hidden
        x = self.x
        n, t, _ = x.shape
        dg_all = np.empty((n, t, 4 * h), F32)
        dR = np.zeros_like(p["R"])
        dh, dc = dy, np.zeros_like(dy)
        for step in reversed(range(t)):
            i, o, f, cc, tc = self.cache[step]
            do = dh * tc
            dc = dc + dh * o * (1 - tc * tc)
            di, df, dcc = dc * cc, dc * self.cs[step], dc * i
            dg = np.concatenate([di * i * (1 - i), do * o * (1 - o), df * f * (1 - f),
                                 dcc * (1 - cc * cc)], axis=1)
            dg_all[:, step] = dg
            dR += dg.T @ self.hs[step]
            dh = dg @ p["R"]
            dc = dc * f
        dgf = dg_all.reshape(n * t, -1)
        db = dgf.sum(0)
        dW = np.ascontiguousarray((x.reshape(n * t, -1).T @ dgf).T)
        self.grads = {"W": dW, "R": dR, "Wb": db, "Rb": db.copy()}
        return (dgf @ p["W"]).reshape(x.shape)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy and its gradient w.r.t. the logits."""
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(1, keepdims=True)
    n = len(labels)
    loss = -np.log(prob[np.arange(n), labels] + 1e-12).mean()
    prob[np.arange(n), labels] -= 1.0
    return float(loss), (prob / n).astype(F32)


class Adam:
    """Adam with L2 weight decay added to the gradient of each layer's ``decay_keys``."""

    def __init__(self, layers, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip=None):
        self.layers = [layer for layer in layers if layer.params]
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.wd, self.clip, self.t = weight_decay, clip, 0
        self.m = [{k: np.zeros_like(v) for k, v in ly.params.items()} for ly in self.layers]
        self.v = [{k: np.zeros_like(v) for k, v in ly.params.items()} for ly in self.layers]

    def step(self):
        """Apply one update using the gradients stored by the last backward pass."""
        self.t += 1
        grads = [{k: ly.grads[k] + (self.wd * ly.params[k] if k in ly.decay_keys else 0)
                  for k in ly.params} for ly in self.layers]
        if self.clip is not None:  # global-norm clipping
            norm = np.sqrt(sum(float((g * g).sum()) for gs in grads for g in gs.values()))
            if norm > self.clip:
                grads = [{k: g * (self.clip / norm) for k, g in gs.items()} for gs in grads]
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for ly, gs, m, v in zip(self.layers, grads, self.m, self.v):
            for k, g in gs.items():
                m[k] = self.b1 * m[k] + (1 - self.b1) * g
                v[k] = self.b2 * v[k] + (1 - self.b2) * g * g
                ly.params[k] -= (self.lr * (m[k] / c1) / (np.sqrt(v[k] / c2) + self.eps)).astype(F32)
