//! Gradients summed by variable name over passes (micro-batches, cached-loss chunks), in f32
//! for half-precision gradients. `train` re-exports [`accumulate_gradients`] for custom loops.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::ops::num::accumulation_dtype;
use crate::Result;

/// Adds the gradients `store` holds for `vars` to `grads` (inserting those not there yet), in
/// f32 for f16 and bf16 gradients: half-precision sums of many micro-batches or chunks would
/// lose the small ones. Variables without a gradient in `store` are left out, so the optimizer
/// leaves them alone.
pub fn accumulate_gradients(
    grads: &mut BTreeMap<String, Tensor>,
    store: &GradStore,
    vars: &[(String, Var)],
) -> Result<()> {
    for (name, var) in vars {
        if let Some(g) = store.get(var) {
            add_gradient(grads, name, g)?;
        }
    }
    Ok(())
}

/// `grads[name] += g`, in f32 for half-precision `g` (`g` itself when `name` has none yet).
pub(crate) fn add_gradient(
    grads: &mut BTreeMap<String, Tensor>,
    name: &str,
    g: &Tensor,
) -> Result<()> {
    let g = g.to_dtype(accumulation_dtype(g.dtype()))?;
    let g = match grads.remove(name) {
        Some(acc) => (acc + g)?,
        None => g,
    };
    grads.insert(name.to_string(), g);
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    type Gradients = BTreeMap<String, Tensor>;

    #[test]
    fn gradients_accumulate_by_name_and_absent_ones_stay_out() {
        let device = Device::Cpu;
        let a = Var::from_vec(vec![2f32], 1, &device).unwrap();
        let b = Var::from_vec(vec![5f32], 1, &device).unwrap();
        let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let mut grads = Gradients::new();
        for _ in 0..2 {
            // d(3a)/da = 3; b takes no part.
            let store = (a.as_tensor() * 3.0)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            accumulate_gradients(&mut grads, &store, &vars).unwrap();
        }
        assert_eq!(grads.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(grads["a"].to_vec1::<f32>().unwrap(), [6.0]);
    }

    /// f16 holds integers exactly only up to 2048: a half-precision running sum of 4000 unit
    /// gradients stalls at 2048 (2048 + 1 rounds back to 2048); the f32 sum is exact.
    #[test]
    fn half_precision_gradients_are_summed_in_f32() {
        let zero = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        let var = Var::from_tensor(&zero.to_dtype(candle_core::DType::F16).unwrap()).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let store = var.as_tensor().sum_all().unwrap().backward().unwrap();
        let mut grads = Gradients::new();
        for _ in 0..4000 {
            accumulate_gradients(&mut grads, &store, &vars).unwrap();
        }
        let sum = &grads["w"];
        assert_eq!(sum.dtype(), candle_core::DType::F32);
        assert_eq!(sum.to_vec1::<f32>().unwrap(), vec![4000.0]);
    }
}
