//! The end of every optimisation step, shared by [`Trainer`](super::Trainer) and NLI
//! fine-tuning: once the backward passes have filled the gradients, clip their global norm,
//! skip the update when the loss or a gradient is not finite (failing after too many in a row),
//! else take the AdamW step with the scheduled learning rate.

use super::config::TrainConfig;
use super::loss_scale::LossScaler;
use super::optimizer::{clip_grad_norm, AdamW, Gradients};
use super::schedule::LrSchedule;
use crate::{Error, Result};

/// How accumulated gradients become an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateRule {
    /// The learning rate of each update.
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Fail with [`Error::Diverged`] at this many non-finite updates in a row (each skipped);
    /// 0 counts as 1.
    pub max_consecutive_bad_steps: usize,
}

impl From<&TrainConfig> for UpdateRule {
    fn from(config: &TrainConfig) -> Self {
        Self {
            schedule: config.schedule,
            max_grad_norm: config.max_grad_norm,
            max_consecutive_bad_steps: config.max_consecutive_bad_steps,
        }
    }
}

/// Updates skipped because the loss or a gradient was not finite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BadSteps {
    /// Skipped in total.
    pub skipped: u64,
    /// Skipped in a row, up to the last update (0 after a real update).
    pub consecutive: usize,
}

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateRecord {
    /// The learning rate of the update (also reported for a skipped one).
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// True when the update was skipped: the loss or the gradient norm was not finite.
    pub skipped: bool,
}

impl UpdateRule {
    /// Applies update `step` (0-based; the schedule's position) to `optimizer`'s parameters:
    /// clips `grads` in place, then either takes the AdamW step with `schedule.lr(step)` or,
    /// when `loss` or the gradient norm is not finite, leaves the parameters and the
    /// optimizer's moments and step count alone and counts the skip in `bad`.
    ///
    /// Errors: [`Error::Diverged`] when this skip makes `max_consecutive_bad_steps` in a row
    /// (`bad` already counts it); the optimizer's and the clipping's tensor errors.
    pub fn apply(
        &self,
        optimizer: &mut AdamW,
        grads: &mut Gradients,
        loss: f32,
        step: u64,
        bad: &mut BadSteps,
    ) -> Result<UpdateRecord> {
        let grad_norm = clip_grad_norm(grads, self.max_grad_norm.unwrap_or(f64::INFINITY))?;
        self.finish(optimizer, grads, loss, grad_norm, step, bad)
    }

    /// [`UpdateRule::apply`] for gradients of a loss scaled by `scaler` (f16 training): divides
    /// them by the scale first. A step whose loss is finite but whose gradients overflowed is
    /// skipped as PyTorch's `GradScaler` skips it: the scale is halved and the skip is counted
    /// in `bad.skipped` but not as a bad step in a row (a too-large scale is not divergence),
    /// until the scaler's `max_overflows_in_a_row`: that many overflows in a row are
    /// [`Error::Diverged`]. The scaler then learns whether the step was finite.
    pub fn apply_scaled(
        &self,
        optimizer: &mut AdamW,
        grads: &mut Gradients,
        loss: f32,
        step: u64,
        bad: &mut BadSteps,
        scaler: &mut LossScaler,
    ) -> Result<UpdateRecord> {
        scaler.unscale(grads)?;
        let grad_norm = clip_grad_norm(grads, self.max_grad_norm.unwrap_or(f64::INFINITY))?;
        if loss.is_finite() && !grad_norm.is_finite() {
            scaler.update(false);
            bad.skipped += 1;
            let overflows = scaler.overflows_in_a_row();
            if overflows >= scaler.max_overflows_in_a_row.max(1) {
                return Err(Error::Diverged {
                    step: step + 1,
                    consecutive: overflows as usize,
                });
            }
            return Ok(UpdateRecord {
                lr: self.schedule.lr(step),
                grad_norm,
                skipped: true,
            });
        }
        let record = self.finish(optimizer, grads, loss, grad_norm, step, bad);
        scaler.update(matches!(record, Ok(UpdateRecord { skipped: false, .. })));
        record
    }

    /// The update after clipping: the AdamW step, or the skip of a non-finite one.
    fn finish(
        &self,
        optimizer: &mut AdamW,
        grads: &Gradients,
        loss: f32,
        grad_norm: f64,
        step: u64,
        bad: &mut BadSteps,
    ) -> Result<UpdateRecord> {
        let lr = self.schedule.lr(step);
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if skipped {
            bad.skipped += 1;
            bad.consecutive += 1;
            if bad.consecutive >= self.max_consecutive_bad_steps.max(1) {
                return Err(Error::Diverged {
                    step: step + 1,
                    consecutive: bad.consecutive,
                });
            }
        } else {
            bad.consecutive = 0;
            optimizer.step(grads, lr)?;
        }
        Ok(UpdateRecord {
            lr,
            grad_norm,
            skipped,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::train::{AdamWConfig, Decay};

    fn rule(max_grad_norm: Option<f64>, max_bad: usize) -> UpdateRule {
        UpdateRule {
            schedule: LrSchedule {
                peak_lr: 0.1,
                warmup_steps: 0,
                total_steps: 10,
                decay: Decay::Linear,
            },
            max_grad_norm,
            max_consecutive_bad_steps: max_bad,
        }
    }

    /// One parameter `w = [1, 2]`, no weight decay.
    fn setup() -> (Var, AdamW) {
        let w = Var::from_vec(vec![1f32, 2.0], 2, &Device::Cpu).unwrap();
        let config = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let optimizer = AdamW::new([("w".to_string(), w.clone())], config).unwrap();
        (w, optimizer)
    }

    fn grads(values: [f32; 2]) -> Gradients {
        let g = Tensor::new(&values, &Device::Cpu).unwrap();
        [("w".to_string(), g)].into_iter().collect()
    }

    fn values(w: &Var) -> Vec<f32> {
        w.as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn a_finite_update_clips_then_takes_the_scheduled_adam_step() {
        let (w, mut optimizer) = setup();
        let mut g = grads([3.0, 4.0]);
        let mut bad = BadSteps {
            skipped: 2,
            consecutive: 2,
        };
        let record = rule(Some(1.0), 5)
            .apply(&mut optimizer, &mut g, 0.5, 4, &mut bad)
            .unwrap();
        // Norm 5 before clipping; lr of step 4 of a linear decay over 10: 0.1 * (1 - 4/10).
        assert_eq!(record.grad_norm, 5.0);
        assert!((record.lr - 0.06).abs() < 1e-12);
        assert!(!record.skipped);
        assert_eq!(
            bad,
            BadSteps {
                skipped: 2,
                consecutive: 0
            }
        );
        let clipped: Vec<f32> = g["w"].to_vec1().unwrap();
        assert!((clipped[0] - 0.6).abs() < 1e-6 && (clipped[1] - 0.8).abs() < 1e-6);
        // Adam's first step moves each weight by lr * sign(g) (bias-corrected m / sqrt(v)).
        let w = values(&w);
        assert!(
            (w[0] - 0.94).abs() < 1e-6 && (w[1] - 1.94).abs() < 1e-6,
            "{w:?}"
        );
        assert_eq!(optimizer.step_count(), 1);
    }

    #[test]
    fn non_finite_updates_are_skipped_counted_and_fail_at_the_limit() {
        let (w, mut optimizer) = setup();
        let rule = rule(None, 3);
        let mut bad = BadSteps::default();
        for (step, loss, g) in [(0, f32::NAN, [1.0, 1.0]), (1, 0.5, [f32::INFINITY, 1.0])] {
            let record = rule
                .apply(&mut optimizer, &mut grads(g), loss, step, &mut bad)
                .unwrap();
            assert!(record.skipped);
        }
        assert_eq!(values(&w), [1.0, 2.0]);
        assert_eq!(optimizer.step_count(), 0);
        assert_eq!(
            bad,
            BadSteps {
                skipped: 2,
                consecutive: 2
            }
        );
        // A finite update resets the run of bad ones, not the total.
        rule.apply(&mut optimizer, &mut grads([1.0, 1.0]), 0.5, 2, &mut bad)
            .unwrap();
        assert_eq!(bad.consecutive, 0);
        assert_eq!(optimizer.step_count(), 1);
        for step in 3..5 {
            rule.apply(
                &mut optimizer,
                &mut grads([1.0, 1.0]),
                f32::NAN,
                step,
                &mut bad,
            )
            .unwrap();
        }
        match rule.apply(
            &mut optimizer,
            &mut grads([1.0, 1.0]),
            f32::NAN,
            5,
            &mut bad,
        ) {
            Err(Error::Diverged { step, consecutive }) => assert_eq!((step, consecutive), (6, 3)),
            other => panic!("expected divergence, got {other:?}"),
        }
        assert_eq!(
            bad,
            BadSteps {
                skipped: 5,
                consecutive: 3
            }
        );
        assert_eq!(optimizer.step_count(), 1);
    }
}
