//! `ParamStore`: the trainable parameters of a model, filled from a checkpoint or initialised.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Trainable parameters by canonical (transformers) name, and a record of how each was obtained.
///
/// A `ParamStore` is a candle [`VarBuilder`] backend: modules ask it for tensors by name with
/// [`VarBuilder::get_with_hints`]. It answers with a [`Var`] made from the checkpoint tensor of
/// that name when there is one, and otherwise with a fresh one drawn from its seeded generator
/// (so that models built from scratch are reproducible on every device). Every variable ends up
/// in [`ParamStore::varmap`], ready for an optimizer.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Inner>,
}

struct Inner {
    varmap: VarMap,
    /// Checkpoint tensors not yet turned into variables (taken out as they are used).
    checkpoint: Mutex<HashMap<String, Tensor>>,
    log: Mutex<LoadLog>,
    rng: Mutex<ChaCha8Rng>,
}

/// What happened to each requested tensor while a model was built from a [`ParamStore`].
#[derive(Debug, Default, Clone)]
pub(crate) struct LoadLog {
    /// Names absent from the checkpoint, freshly initialised.
    pub initialized: Vec<String>,
    /// Names whose checkpoint tensor had another shape: (name, expected, actual).
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("vars", &self.inner.varmap.all_vars().len())
            .field("unused_checkpoint_tensors", &self.checkpoint().len())
            .finish()
    }
}

impl ParamStore {
    /// An empty store: every parameter will be initialised from `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_checkpoint(HashMap::new(), seed)
    }

    /// A store that serves the given tensors (by canonical name) and initialises the rest
    /// from `seed`.
    pub fn with_checkpoint(checkpoint: HashMap<String, Tensor>, seed: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                varmap: VarMap::new(),
                checkpoint: Mutex::new(checkpoint),
                log: Mutex::new(LoadLog::default()),
                rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            }),
        }
    }

    /// A [`VarBuilder`] over this store that creates variables of `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The variables, by canonical name: hand `varmap().all_vars()` to an optimizer.
    pub fn varmap(&self) -> &VarMap {
        &self.inner.varmap
    }

    /// Every variable with its canonical name, sorted by name.
    pub fn named_vars(&self) -> BTreeMap<String, Var> {
        self.vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Names of checkpoint tensors that no module asked for.
    pub(crate) fn unused_checkpoint_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.checkpoint().keys().cloned().collect();
        names.sort();
        names
    }

    fn checkpoint(&self) -> MutexGuard<'_, HashMap<String, Tensor>> {
        self.inner
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The variables map, locked (a poisoned lock is still usable: it only guards a map).
    fn vars(&self) -> MutexGuard<'_, HashMap<String, Var>> {
        self.inner
            .varmap
            .data()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn log(&self) -> MutexGuard<'_, LoadLog> {
        self.inner.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn init_var(
        &self,
        shape: &Shape,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Var> {
        let n = shape.elem_count();
        let values: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => {
                let normal = Normal::new(mean as f32, stdev as f32)
                    .map_err(|e| candle_core::Error::Msg(format!("bad init: {e}")))?;
                let mut rng = self.inner.rng.lock().unwrap_or_else(|p| p.into_inner());
                (0..n).map(|_| normal.sample(&mut *rng)).collect()
            }
            Init::Uniform { lo, up } => {
                let mut rng = self.inner.rng.lock().unwrap_or_else(|p| p.into_inner());
                (0..n)
                    .map(|_| rng.random_range(lo as f32..up as f32))
                    .collect()
            }
            // Modules here ask for constants, normals and uniforms; Kaiming keeps candle's meaning.
            other => return other.var(shape, dtype, device),
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        Var::from_tensor(&t)
    }
}

impl SimpleBackend for ParamStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(var) = self.vars().get(name) {
            return Ok(var.as_tensor().clone());
        }
        let from_checkpoint = self.checkpoint().remove(name);
        let var = match from_checkpoint {
            Some(t) if t.shape() == &shape => {
                Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?
            }
            Some(t) => {
                let actual = t.dims().to_vec();
                self.log()
                    .mismatched
                    .push((name.to_string(), shape.dims().to_vec(), actual));
                self.init_var(&shape, init, dtype, device)?
            }
            None => {
                self.log().initialized.push(name.to_string());
                self.init_var(&shape, init, dtype, device)?
            }
        };
        let tensor = var.as_tensor().clone();
        self.vars().insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.vars().get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(device),
            None => candle_core::bail!("no parameter named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.checkpoint().contains_key(name) || self.vars().contains_key(name)
    }
}
