//! What the fused CZ-NCE op is asked to compute: which logits enter the partition function, the
//! resolved logit scale, the backward's memory trade-off and the normalisation's epsilon. The
//! kernels (CPU, CUDA) and the composite twin in `loss::cz_nce` all read these.

/// Which logits enter the partition function. Mirrors the options of `loss::CzNce`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Spec {
    /// InfoNCE (`true`) or CZ-NCE (`false`).
    pub include_positive: bool,
    /// Same-side-as-anchor negatives (`sim_in` for q→k).
    pub anchor_negatives: bool,
    /// Target-side negatives (`sim_kk` for q→k).
    pub target_negatives: bool,
    /// Average q→k and k→q.
    pub symmetric: bool,
    /// L2-normalize the rows (cosine similarity) or use raw dot products.
    pub normalize: bool,
}

impl Spec {
    /// Whether a direction reads `Ŝ_in = q̂ q̂ᵀ`: q→k's anchor negatives or k→q's targets.
    pub(crate) fn needs_in(&self) -> bool {
        self.anchor_negatives || (self.symmetric && self.target_negatives)
    }

    /// Whether a direction reads `Ŝ_kk = k̂ k̂ᵀ`: q→k's target negatives or k→q's anchors.
    pub(crate) fn needs_kk(&self) -> bool {
        self.target_negatives || (self.symmetric && self.anchor_negatives)
    }

    /// Whether both directions read the same-batch blocks (symmetric, with both kinds of
    /// negatives): a kernel whose row pass overwrites a block copies it for the first.
    pub(crate) fn blocks_read_twice(&self) -> bool {
        self.symmetric && self.anchor_negatives && self.target_negatives
    }
}

/// Epsilon of the row normalization `x / max(‖x‖, ε)`.
pub(crate) const NORM_EPS: f64 = 1e-8;

/// The fused op's memory/compute trade-off for the backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackwardMode {
    /// Compute the gradients during the forward (only when the inputs track gradients) and keep
    /// them (`2·B·D` values) until the backward rescales them. Fastest.
    #[default]
    GradInForward,
    /// Keep nothing; the backward reruns the kernel (two to three extra `B²D` GEMMs).
    Recompute,
}

/// The logit scale `1/t` a forward uses, resolved (and for a learnable temperature, clamped)
/// once on the host so that the fused op and the composite twin make the same decision.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogitScale {
    /// `1/t`: the fixed scale, or `min(exp(θ), max)`.
    pub value: f64,
    /// Whether the clamp is active (`exp(θ) > max`): then `∂L/∂θ = 0`.
    pub clamped: bool,
}

impl LogitScale {
    /// `min(exp(θ), max)`, computed in f64 from `θ` as stored.
    pub(crate) fn learnable(log_scale: f64, max: f64) -> Self {
        let s = log_scale.exp();
        if s > max {
            Self {
                value: max,
                clamped: true,
            }
        } else {
            Self {
                value: s,
                clamped: false,
            }
        }
    }
}
