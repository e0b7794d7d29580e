// attnpipe's block-sparse attention on CPUs: the kernel loop of models/attention/blocksparse.py
// in C++, with (batch, head) pairs spread over the cores.
//
// The Python loop runs one op at a time on every core: each op forks and joins the thread
// pool, and a step's tiles are shared by caches of both cores. Here each core takes whole
// heads and runs its ops on its own, in buffers of its own sized for its own L2 cache, with
// no Python between the ops. The arithmetic is the same op for op (see blocksparse.py for
// the algorithm): results equal the Python loop's bit for bit.
//
// Shapes: B batch, H query heads, Hkv key/value heads, S sequence, D head dim, N query
// blocks, K key slots per query block, bs block size, c query blocks per step.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

// Query blocks [c0, c1) of one (batch, head): the key block of each slot, the additive masks
// of its partial tiles, and the key blocks its slot gradients go to.
struct Step {
  int64_t c0, c1;
  Tensor idx;                                              // (c * K,) key block per slot
  std::vector<std::tuple<int64_t, int64_t, Tensor>> masks; // (first column, end column, bias)
  Tensor dest;                                             // key block of each kept slot
  std::optional<Tensor> keep;                              // kept slots; none: all of them
};

// Steps of every (batch row, head) of a plan: Bm x Hm lists, Bm or Hm 1 when shared.
struct StepTable {
  int64_t bm, hm, bs, slots, lead, chunk;  // lead < 0: gathered slots, else a band's lead
  std::vector<std::vector<Step>> steps;
  const std::vector<Step>& of(int64_t b, int64_t h) const {
    return steps[std::min(b, bm - 1) * hm + std::min(h, hm - 1)];
  }
};

// One head's rows (S, D) as blocks (N, bs, D): a view when they are contiguous, else a copy
// into this thread's zero-padded buffer.
Tensor blocks_of(const Tensor& x, int64_t n, int64_t bs, Tensor& buf) {
  const int64_t S = x.size(0), D = x.size(1);
  if (n * bs == S && x.stride(1) == 1 && x.stride(0) == D) return x.view({n, bs, D});
  if (!buf.defined()) buf = at::zeros({n * bs, D}, x.options());
  buf.narrow(0, 0, S).copy_(x);
  return buf.view({n, bs, D});
}

// Key or value slots of one head: a strided view for bands (a zero-padded copy where a window
// runs off either end), else a gather into `buf`.
Tensor take(const StepTable& t, const Step& step, const Tensor& blocks, Tensor& buf) {
  const int64_t n = blocks.size(0), bs = t.bs, D = blocks.size(2), K = t.slots;
  const int64_t c = step.c1 - step.c0;
  if (t.lead < 0) {
    Tensor out = buf.narrow(0, 0, c * K * bs).view({c * K, bs, D});
    at::index_select_out(out, blocks, 0, step.idx);
    return out.view({c, K * bs, D});
  }
  const Tensor x = blocks.view({n * bs, D});
  const int64_t first = step.c0 - t.lead, last = step.c1 - 1 - t.lead + K;  // [first, last)
  Tensor src = x;
  int64_t offset = first * bs;
  if (first < 0 || last > n) {
    src = buf.narrow(0, 0, (last - first) * bs);
    src.zero_();
    const int64_t lo = std::max<int64_t>(first, 0), hi = std::min<int64_t>(last, n);
    src.narrow(0, (lo - first) * bs, (hi - lo) * bs).copy_(x.narrow(0, lo * bs, (hi - lo) * bs));
    offset = 0;
  }
  return src.as_strided({c, K * bs, D}, {bs * D, D, 1}, src.storage_offset() + offset * D);
}

void apply_masks(Tensor& s, const Step& step) {
  for (const auto& [lo, hi, bias] : step.masks) s.narrow(-1, lo, hi - lo).add_(bias);
}

void accumulate(Tensor& grad, const Step& step, const Tensor& tiles) {
  grad.index_add_(0, step.dest, step.keep ? tiles.index_select(0, *step.keep) : tiles);
}

Tensor prefix(const Tensor& x, int64_t c, int64_t chunk) {
  return c == chunk ? x : x.narrow(0, 0, c);
}

// Buffers of one thread, allocated once for all the heads it takes.
struct Workspace {
  Tensor q, g, k, v, scratch_k, scratch_v;  // blocks of heads whose rows need a copy
  Tensor slots, s, ds, dkv;
  Workspace(const StepTable& t, const Tensor& like, int64_t D, bool backward) {
    const int64_t bs = t.bs, K = t.slots, c = t.chunk;
    const int64_t rows = t.lead >= 0 ? c + K - 1 : c * K;
    slots = at::empty({rows * bs, D}, like.options());
    s = at::empty({c, bs, K * bs}, like.options());
    if (backward) {
      ds = at::empty({c, bs, K * bs}, like.options());
      dkv = at::empty({c, K * bs, D}, like.options());  // dV of the slots, V's slots, dK
    }
  }
};

}  // namespace

// out (B, H, N*bs, D) from q (B, H, S, D), k and v (B, Hkv, S, D), any strides.
void forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
             const StepTable& t, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), n = out.size(2) / t.bs;
  const int64_t groups = H / k.size(1), bs = t.bs;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // the pool's threads start with grad mode on
    Workspace w(t, q, D, false);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, kvh = h / groups;
      const Tensor qh = blocks_of(q[b][h], n, bs, w.q);
      const Tensor keys = blocks_of(k[b][kvh], n, bs, w.k);
      const Tensor values = blocks_of(v[b][kvh], n, bs, w.v);
      Tensor oh = out[b][h].view({n, bs, D});
      for (const Step& step : t.of(b, h)) {
        const int64_t c = step.c1 - step.c0;
        Tensor s = prefix(w.s, c, t.chunk);
        at::baddbmm_out(s, s, qh.narrow(0, step.c0, c), take(t, step, keys, w.slots).mT(), 0,
                        scale);
        apply_masks(s, step);
        at::_softmax_out(s, s, -1, false);  // in place: the row is in cache
        Tensor o = oh.narrow(0, step.c0, c);
        at::bmm_out(o, s, take(t, step, values, w.slots));  // keys are done with by now
      }
    }
  });
}

// dq (B, H, N*bs, D), dk and dv (B, Hkv, S, D) from the forward's inputs and grad_out.
void backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& grad_out,
              Tensor& dq, Tensor& dk, Tensor& dv, const StepTable& t, double scale) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), groups = H / Hkv, bs = t.bs, n = dq.size(2) / bs;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;
    Workspace w(t, q, D, true);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, kvh = i % Hkv;
      Tensor dk_h = dk[b][kvh], dv_h = dv[b][kvh];
      // gradients accumulate per key block, in place when the rows are contiguous
      const bool in_place = n * bs == S && dk_h.stride(0) == D && dv_h.stride(0) == D &&
                            dk_h.stride(1) == 1 && dv_h.stride(1) == 1;
      if (!in_place && !w.scratch_k.defined()) {
        w.scratch_k = at::empty({n, bs, D}, q.options());
        w.scratch_v = at::empty({n, bs, D}, q.options());
      }
      Tensor gk = in_place ? dk_h.view({n, bs, D}) : w.scratch_k;
      Tensor gv = in_place ? dv_h.view({n, bs, D}) : w.scratch_v;
      gk.zero_();
      gv.zero_();
      const Tensor keys = blocks_of(k[b][kvh], n, bs, w.k);
      const Tensor values = blocks_of(v[b][kvh], n, bs, w.v);
      for (int64_t h = kvh * groups; h < (kvh + 1) * groups; ++h) {
        const Tensor qh = blocks_of(q[b][h], n, bs, w.q);
        const Tensor doh = blocks_of(grad_out[b][h], n, bs, w.g);
        Tensor dqh = dq[b][h].view({n, bs, D});
        for (const Step& step : t.of(b, h)) {
          const int64_t c0 = step.c0, c = step.c1 - step.c0;
          const Tensor q_c = qh.narrow(0, c0, c), do_c = doh.narrow(0, c0, c);
          Tensor dq_c = dqh.narrow(0, c0, c);
          Tensor s = prefix(w.s, c, t.chunk), ds = prefix(w.ds, c, t.chunk);
          Tensor dkv = prefix(w.dkv, c, t.chunk);
          const Tensor tiles = dkv.view({c * t.slots, bs, D});
          // in an order that keeps few score- or slot-sized buffers live at once
          const Tensor kg = take(t, step, keys, w.slots);
          at::baddbmm_out(s, s, q_c, kg.mT(), 0, scale);
          apply_masks(s, step);
          at::_softmax_out(s, s, -1, false);  // P, recomputed in place
          at::bmm_out(dkv, s.mT(), do_c);     // dV of the slots
          accumulate(gv, step, tiles);
          // dS = P * (dP - rowsum(P * dP)): softmax's own fused backward
          Tensor value_buf = w.dkv.view({-1, D});
          at::bmm_out(ds, do_c, take(t, step, values, value_buf).mT());
          at::_softmax_backward_data_out(ds, ds, s, -1, s.scalar_type());
          at::baddbmm_out(dq_c, dq_c, ds, kg, 0, scale);
          at::baddbmm_out(dkv, dkv, ds.mT(), q_c, 0, scale);  // dK
          accumulate(gk, step, tiles);
        }
      }
      if (!in_place) {
        dk_h.copy_(gk.view({n * bs, D}).narrow(0, 0, S));
        dv_h.copy_(gv.view({n * bs, D}).narrow(0, 0, S));
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  py::class_<Step>(m, "Step")
      .def(py::init([](int64_t c0, int64_t c1, Tensor idx,
                       std::vector<std::tuple<int64_t, int64_t, Tensor>> masks, Tensor dest,
                       std::optional<Tensor> keep) {
        return Step{c0, c1, std::move(idx), std::move(masks), std::move(dest), std::move(keep)};
      }));
  py::class_<StepTable>(m, "StepTable")
      .def(py::init([](int64_t bm, int64_t hm, int64_t bs, int64_t slots, int64_t lead,
                       int64_t chunk, std::vector<std::vector<Step>> steps) {
        return StepTable{bm, hm, bs, slots, lead, chunk, std::move(steps)};
      }));
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
}
