//! Non-finite values (NaN, ±inf) planted in a case's inputs, and the check that they reach
//! the outputs the f64 reference says they reach: never hidden (a NaN turned into a finite
//! number), never spread beyond what the tiling of every flash kernel spreads.
//!
//! The one spread the reference does not have: a product with a masked probability is 0 · x,
//! and 0 · NaN is NaN. Kernels multiply whole tiles, so a non-finite element of the *second*
//! operand of a product (V in O = P·V; dO in dV = Pᵀ·dO, Q in dK = dSᵀ·Q and K in dQ = dS·K)
//! can reach an output element it is masked from, in the same column, when the two share a
//! tile. PyTorch's math backend spreads it to every row. The check allows exactly that; keys
//! beyond a sequence's length are never read, so nothing spreads from them. And a key whose
//! score is -inf only because q or k holds an infinity (not masked by the caller) may take a
//! NaN row's gradient whole: the fast backward kernels spend no select on it.

use super::{Instance, Storage, Tensor};
use crate::reference::{reference_backward, reference_masked_keys};
use ufa::Result;

/// An input a value can be planted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    Q,
    K,
    V,
    /// An additive (float) mask; a case without one, or with a boolean one, has no such site.
    Mask,
    /// ALiBi slopes, where the case has them.
    Alibi,
    /// The backward pass's incoming gradient.
    Dout,
}

/// One planted value: `pick` chooses the element (modulo the tensor's logical size).
#[derive(Clone, Copy, Debug)]
pub struct Plant {
    pub site: Site,
    pub pick: u64,
    pub value: f32,
}

/// The outcome of a check: every output element whose finiteness differs from the
/// reference's, beyond the spread described in the module documentation.
#[derive(Clone, Debug, Default)]
pub struct NonFiniteReport {
    pub mismatches: Vec<String>,
    /// Output elements (and LSEs) that are non-finite in the reference.
    pub nonfinite: usize,
    /// Non-finite output elements that the reference has finite, allowed as tile spread.
    pub spread: usize,
    /// Where the values went, as (site, logical index).
    pub planted: Vec<(Site, Vec<usize>)>,
}

impl NonFiniteReport {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }

    pub fn summary(&self) -> String {
        let shown: Vec<&str> = self.mismatches.iter().take(4).map(|s| s.as_str()).collect();
        format!(
            "planted {:?}: {} non-finite in the reference, {} spread by tiles, {} mismatches{}{}",
            self.planted,
            self.nonfinite,
            self.spread,
            self.mismatches.len(),
            if shown.is_empty() { "" } else { ": " },
            shown.join("; ")
        )
    }
}

impl Tensor {
    /// Sets the element `pick` (modulo the logical size) to `x`; returns its logical index.
    fn plant(&mut self, pick: u64, x: f32) -> Vec<usize> {
        let n: usize = self.shape.iter().product();
        let mut rest = (pick % n.max(1) as u64) as usize;
        let mut idx = vec![0; self.shape.len()];
        for d in (0..self.shape.len()).rev() {
            idx[d] = rest % self.shape[d];
            rest /= self.shape[d];
        }
        let at = idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
        self.storage.set(at, x);
        idx
    }
}

impl Instance {
    /// Plants `p`; returns where, or None where the case has no such input (no additive mask,
    /// no ALiBi) or it is empty.
    pub fn plant(&mut self, p: &Plant) -> Option<Vec<usize>> {
        let t = match p.site {
            Site::Q => &mut self.q,
            Site::K => &mut self.k,
            Site::V => &mut self.v,
            Site::Mask => self
                .mask
                .as_mut()
                .filter(|m| !matches!(m.storage, Storage::Bool(_)))?,
            Site::Alibi => self.alibi.as_mut()?,
            Site::Dout => &mut self.grad_tensors().dout,
        };
        if t.shape.contains(&0) {
            return None;
        }
        Some(t.plant(p.pick, p.value))
    }
}

/// Plants `plants` in the inputs of `case` (drawn from `seed`), runs it with `run` (which must
/// run the backward too when `backward`), and compares which outputs are non-finite with the
/// f64 reference. The backward is compared with the reference that takes its softmax term
/// from the stored output, as the kernels do, so a spread in the forward's output carries
/// over consistently.
pub fn check_nonfinite_with(
    case: &super::Case,
    seed: u64,
    plants: &[Plant],
    backward: bool,
    run: impl FnOnce(&mut Instance) -> Result<()>,
) -> Result<NonFiniteReport> {
    let mut case = case.clone();
    case.with_lse = case.with_lse || backward;
    let mut inst = Instance::new(&case, seed);
    let mut report = NonFiniteReport::default();
    for p in plants {
        if let Some(at) = inst.plant(p) {
            report.planted.push((p.site, at));
        }
    }
    run(&mut inst)?;
    let c = &inst.case;
    let (q, k, v) = (inst.q.view()?, inst.k.view()?, inst.v.view()?);
    let params = inst.params()?;
    let masked = reference_masked_keys(&q, &k, &v, &params)?;
    let group = c.heads_q / c.heads_kv;
    let pair = |b: usize, h: usize, i: usize, j: usize| {
        masked[((b * c.heads_q + h) * c.seqlen_q + i) * c.seqlen_kv + j]
    };
    let is_masked = |b: usize, h: usize, i: usize, j: usize| pair(b, h, i, j).0;
    // Whether a planted element of `site` at [b, row, head, e] can reach output [b, x, hx, e]
    // through a masked pair of a shared tile. `q_side`: the output is indexed by query rows
    // (x = i, hx = h) and the planted value by keys, or the other way round.
    let planted = report.planted.clone();
    let spreads = |site: Site, q_side: bool, b: usize, x: usize, hx: usize, e: usize| {
        planted.iter().any(|(s, at)| {
            if *s != site || at[0] != b || at[3] != e {
                return false;
            }
            if q_side {
                // output row (x, head hx), planted key at[1] of KV head at[2]
                hx / group == at[2] && is_masked(b, hx, x, at[1])
            } else {
                // output key x of KV head hx, planted query row at[1] of head at[2]
                at[2] / group == hx && is_masked(b, at[2], at[1], x)
            }
        })
    };

    let reference = inst.reference()?;
    let (out, lse) = inst.outputs();
    let mut i = 0;
    for b in 0..c.batch {
        for s in 0..c.seqlen_q {
            for h in 0..c.heads_q {
                for e in 0..c.head_dim_v {
                    let (got, want) = (out[i], reference.out[i]);
                    i += 1;
                    compare(&mut report, "out", [b, s, h, e], got, want, || {
                        spreads(Site::V, true, b, s, h, e)
                    });
                }
            }
        }
    }
    if let Some(lse) = lse {
        for (n, (&got, &want)) in lse.iter().zip(&reference.lse).enumerate() {
            let (b, h, s) = (
                n / (c.heads_q * c.seqlen_q),
                n / c.seqlen_q % c.heads_q,
                n % c.seqlen_q,
            );
            // -inf is the LSE of a row that sees no key, not a non-finite result.
            let class = |x: f64| (x.is_nan(), x == f64::NEG_INFINITY);
            if want.is_nan() {
                report.nonfinite += 1;
            }
            if class(got) != class(want) {
                report.mismatches.push(format!(
                    "lse[{b}, {h}, {s}] = {got} where the reference has {want}"
                ));
            }
        }
    }
    if !backward {
        return Ok(report);
    }

    let g = inst.grads.as_ref().expect("the backward ran");
    let want = reference_backward(
        &q,
        &k,
        &v,
        &g.dout.view()?,
        Some(&inst.out.view()?),
        &params,
    )?;
    // A key whose score is -inf because of a non-finite q or k (not masked by the caller) may
    // pass a NaN row's gradient on, whole: the fast kernels spend no select on masks the
    // caller did not ask for. A row is NaN where its LSE is, or D = dO · out is.
    let row_nan = |b: usize, h: usize, i: usize| {
        let dv = c.head_dim_v;
        reference.lse[(b * c.heads_q + h) * c.seqlen_q + i].is_nan()
            || (0..dv).any(|e| {
                let at = ((b * c.seqlen_q + i) * c.heads_q + h) * dv + e;
                !out[at].is_finite() || !g.dout.at(&[b, i, h, e]).is_finite()
            })
    };
    let mut data_spread = vec![false; c.batch * c.seqlen_kv * c.heads_kv];
    for b in 0..c.batch {
        for h in 0..c.heads_q {
            for i in 0..c.seqlen_q {
                let nan = std::cell::OnceCell::new();
                for j in 0..c.seqlen_kv {
                    let (m, by_caller) = pair(b, h, i, j);
                    if m && !by_caller && *nan.get_or_init(|| row_nan(b, h, i)) {
                        data_spread[(b * c.seqlen_kv + j) * c.heads_kv + h / group] = true;
                    }
                }
            }
        }
    }
    let grads = [
        ("dq", &g.dq, &want.dq, Site::K, true),
        ("dk", &g.dk, &want.dk, Site::Q, false),
        ("dv", &g.dv, &want.dv, Site::Dout, false),
    ];
    for (name, t, want, source, q_side) in grads {
        let [d0, d1, d2, d3] = [t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
        let mut i = 0;
        for b in 0..d0 {
            for x in 0..d1 {
                for hx in 0..d2 {
                    for e in 0..d3 {
                        let got = t.at(&[b, x, hx, e]);
                        compare(&mut report, name, [b, x, hx, e], got, want[i], || {
                            spreads(source, q_side, b, x, hx, e)
                                || (!q_side && data_spread[(b * d1 + x) * d2 + hx])
                        });
                        i += 1;
                    }
                }
            }
        }
    }
    Ok(report)
}

/// One output element: a non-finite reference value must stay non-finite; a finite one must
/// stay finite unless `spread` allows it.
fn compare(
    report: &mut NonFiniteReport,
    name: &str,
    at: [usize; 4],
    got: f64,
    want: f64,
    spread: impl FnOnce() -> bool,
) {
    match (got.is_finite(), want.is_finite()) {
        (true, false) => report.mismatches.push(format!(
            "{name}{at:?} = {got} where the reference has {want}"
        )),
        (false, true) if spread() => report.spread += 1,
        (false, true) => report.mismatches.push(format!(
            "{name}{at:?} = {got} where the reference has {want}"
        )),
        (false, false) => report.nonfinite += 1,
        (true, true) => {}
    }
}

/// A case with the values to plant, and whether the backward runs too.
#[derive(Clone, Debug)]
pub struct NonFiniteCase {
    pub case: super::Case,
    pub plants: Vec<Plant>,
    pub backward: bool,
}

impl super::Described for NonFiniteCase {
    fn describe(&self) -> String {
        let plants: Vec<String> = self
            .plants
            .iter()
            .map(|p| format!("{:?}={}", p.site, p.value))
            .collect();
        format!(
            "{}{} [{}]",
            if self.backward { "fwd+bwd " } else { "fwd " },
            self.case.describe(),
            plants.join(" ")
        )
    }
}

/// Runs a [`NonFiniteCase`] on the CPU.
pub fn check_nonfinite(
    ctx: &ufa::Context,
    c: &NonFiniteCase,
    seed: u64,
) -> Result<NonFiniteReport> {
    check_nonfinite_with(&c.case, seed, &c.plants, c.backward, |inst| {
        inst.run(ctx)?;
        if c.backward {
            inst.run_backward(ctx)?;
        }
        Ok(())
    })
}

/// Fixed cases for every backend: each value (NaN, +inf, -inf) in each input, over the
/// kernels' paths (no masking, causal and windowed tiles, an additive mask, ALiBi, softcap,
/// GQA, few query rows over many keys as in decoding, fp32 and 16-bit inputs, head dims on
/// and off the tensor-core set), forward alone and with the backward.
pub fn nonfinite_cases() -> Vec<NonFiniteCase> {
    use super::{Alibi, Case, MaskSpec};
    use ufa::DType;
    let mut cases = Vec::new();
    let values = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    let shapes: [(usize, usize, usize, usize, usize); 5] = [
        // (seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim)
        (70, 150, 4, 2, 64),
        (128, 128, 2, 2, 128),
        (1, 2000, 8, 2, 64), // decoding: few rows, many keys (split over the keys)
        (33, 47, 2, 1, 40),
        (200, 90, 2, 2, 96),
    ];
    let mut n = 0u64;
    for (si, &(sq, skv, hq, hkv, d)) in shapes.iter().enumerate() {
        for dtype in [DType::BF16, DType::F32, DType::F16] {
            let mut c = Case::new(2, sq, skv, hq, d, dtype);
            c.heads_kv = hkv;
            match (si + dtype as usize) % 4 {
                0 => c.causal = true,
                1 => {
                    c.window = (20, 5);
                    c.alibi = Some(Alibi::PerHead);
                }
                2 => {
                    c.mask = Some(MaskSpec {
                        dtype: DType::F32,
                        full: [false, false, true, true],
                        ndim: 2,
                    });
                    c.causal = true;
                }
                _ => c.softcap = 10.0,
            }
            let mut sites = vec![Site::Q, Site::K, Site::V, Site::Dout];
            if c.mask.is_some() {
                sites.push(Site::Mask);
            }
            if c.alibi.is_some() {
                sites.push(Site::Alibi);
            }
            // The value turns with the case, so each site meets each value across the shapes.
            for site in sites {
                n += 1;
                let value = values[(n % 3) as usize];
                let backward = site == Site::Dout || n.is_multiple_of(2);
                let pick = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 8;
                cases.push(NonFiniteCase {
                    case: c.clone(),
                    plants: vec![Plant { site, pick, value }],
                    backward,
                });
            }
        }
    }
    // The example: one NaN in one key makes every row of that head NaN.
    let mut c = Case::new(1, 4, 4, 2, 8, DType::F32);
    c.with_lse = true;
    cases.push(NonFiniteCase {
        case: c,
        plants: vec![Plant {
            site: Site::K,
            pick: 11,
            value: f32::NAN,
        }],
        backward: true,
    });
    cases
}

/// Runs a [`NonFiniteCase`] on CUDA device `ordinal`.
pub fn check_nonfinite_cuda(
    ctx: &ufa::Context,
    c: &NonFiniteCase,
    seed: u64,
    ordinal: u32,
) -> Result<NonFiniteReport> {
    check_nonfinite_with(&c.case, seed, &c.plants, c.backward, |inst| {
        if c.backward {
            inst.run_backward_cuda(ctx, ordinal)
        } else {
            inst.run_cuda(ctx, ordinal)
        }
    })
}
