//! sentence-transformers model directories, read and written as the Python library does.
//!
//! A directory saved by `SentenceTransformer.save` is a transformers model directory plus
//! `modules.json`, which lists the modules a sentence passes through: the `Transformer` (the
//! directory itself), a `Pooling` module (`1_Pooling/config.json`), optionally `Dense` modules
//! (`2_Dense/config.json` and weights) and a `Normalize` module. Beside them,
//! `sentence_bert_config.json` holds `max_seq_length` and `do_lower_case`, and
//! `config_sentence_transformers.json` the named prompts (`"query": "query: "`).
//!
//! [`PretrainedBert::load`](crate::pretrained::PretrainedBert::load) reads these files into a
//! [`SentenceTransformerConfig`] when `modules.json` is present, and
//! [`PretrainedBert::encode`](crate::pretrained::PretrainedBert::encode) then follows it, so the
//! vectors are those of `SentenceTransformer(dir).encode(...)`; `save` writes the files back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use crate::fs::{
    write_atomic, MODULES_FILE, SENTENCE_BERT_CONFIG_FILE, SENTENCE_TRANSFORMERS_CONFIG_FILE,
};
use crate::pooling::{Pooling, PoolingMode};
use crate::{Error, Result};

const DENSE_WEIGHTS_FILE: &str = "model.safetensors";
const MODULE_CONFIG_FILE: &str = "config.json";

/// A `Dense` module's activation (`activation_function` in its `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `torch.nn.modules.linear.Identity`.
    Identity,
    /// `torch.nn.modules.activation.Tanh` (sentence-transformers' default).
    Tanh,
    /// `torch.nn.modules.activation.ReLU`.
    Relu,
    /// `torch.nn.modules.activation.Sigmoid`.
    Sigmoid,
    /// `torch.nn.modules.activation.GELU` (the erf form).
    Gelu,
}

impl Activation {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name.rsplit('.').next().unwrap_or(name) {
            "Identity" => Activation::Identity,
            "Tanh" => Activation::Tanh,
            "ReLU" => Activation::Relu,
            "Sigmoid" => Activation::Sigmoid,
            "GELU" => Activation::Gelu,
            _ => return None,
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Identity => x.clone(),
            Activation::Tanh => x.tanh()?,
            Activation::Relu => x.relu()?,
            Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
            Activation::Gelu => x.gelu_erf()?,
        })
    }
}

/// A `Dense` module: `activation(x W^T + b)`, its weights kept in f32 on the CPU.
#[derive(Debug, Clone)]
pub struct Dense {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, when the module has a bias.
    pub bias: Option<Tensor>,
    /// Applied after the linear map.
    pub activation: Activation,
    /// The module's `config.json` as read (written back by [`SentenceTransformerConfig::save`]).
    config: Map<String, Value>,
}

impl Dense {
    /// Writes the module's `config.json` and its weights (`linear.weight`, `linear.bias`) into
    /// `folder`.
    fn save(&self, folder: &Path) -> Result<()> {
        write_json(
            &folder.join(MODULE_CONFIG_FILE),
            &Value::Object(self.config.clone()),
        )?;
        let mut tensors = vec![("linear.weight".to_string(), &self.weight)];
        if let Some(bias) = &self.bias {
            tensors.push(("linear.bias".to_string(), bias));
        }
        let path = folder.join(DENSE_WEIGHTS_FILE);
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::tensor::serialize(tensors, Some(metadata))
            .map_err(|e| bad(&path, format!("cannot serialise ({e})")))?;
        write_atomic(&path, &bytes)
    }

    /// Applies the module to `[n, in_features]` vectors.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let (_, d) = x.dims2()?;
        let (out, d_w) = self.weight.dims2()?;
        if d != d_w {
            return Err(Error::ShapeMismatch {
                name: "Dense input".into(),
                expected: vec![x.dims()[0], d_w],
                actual: x.dims().to_vec(),
            });
        }
        let mut y = x.matmul(&self.weight.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.reshape((1, out))?)?;
        }
        self.activation.apply(&y)
    }
}

/// What one entry of `modules.json` is.
#[derive(Debug, Clone)]
pub enum ModuleKind {
    /// The transformer itself (the directory's `config.json` and weights).
    Transformer,
    /// The pooling module; its settings are [`SentenceTransformerConfig::pooling`] and
    /// [`SentenceTransformerConfig::include_prompt`].
    Pooling,
    /// A dense layer.
    Dense(Dense),
    /// Scaling to unit length.
    Normalize,
}

/// One entry of `modules.json`.
#[derive(Debug, Clone)]
pub struct Module {
    /// Its `name` (`"0"`, `"1"`, ...).
    pub name: String,
    /// Its folder inside the model directory (`""` for the transformer, `"1_Pooling"`, ...).
    pub path: String,
    /// Its Python class (`sentence_transformers.models.Pooling`, ...).
    pub type_name: String,
    /// What it does.
    pub kind: ModuleKind,
}

/// A sentence-transformers model's own way of embedding a sentence, from its directory's
/// `modules.json` and the files it names.
#[derive(Debug, Clone)]
pub struct SentenceTransformerConfig {
    /// The modules in order: the transformer first, then pooling, dense and normalize modules.
    pub modules: Vec<Module>,
    /// The pooling modes (`1_Pooling/config.json`), over the last hidden layer.
    pub pooling: Pooling,
    /// Whether a prompt's tokens count in the pooling (`include_prompt`; `true` by default).
    pub include_prompt: bool,
    /// The longest input in tokens, special tokens included (`max_seq_length`, see
    /// [`SentenceTransformerConfig::from_dir`]); `None` leaves the tokenizer's limit.
    pub max_seq_length: Option<usize>,
    /// Whether texts are lower-cased before tokenization (`do_lower_case`).
    pub do_lower_case: bool,
    /// Named prompts (`config_sentence_transformers.json`'s `prompts`), e.g.
    /// `"query" -> "query: "`.
    pub prompts: BTreeMap<String, String>,
    /// The prompt used when none is chosen (`default_prompt_name`).
    pub default_prompt_name: Option<String>,
    /// `1_Pooling/config.json` as read, for the keys this crate does not interpret.
    pooling_config: Map<String, Value>,
    /// `sentence_bert_config.json` as read.
    sentence_bert_config: Map<String, Value>,
    /// `config_sentence_transformers.json` as read.
    model_config: Map<String, Value>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn read_object(path: &Path) -> Result<Map<String, Value>> {
    match read_json(path)? {
        Value::Object(map) => Ok(map),
        _ => Err(bad(path, "expected a JSON object")),
    }
}

fn read_optional_object(path: &Path) -> Result<Map<String, Value>> {
    if path.is_file() {
        read_object(path)
    } else {
        Ok(Map::new())
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn flag(map: &Map<String, Value>, key: &str, path: &Path) -> Result<bool> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(
            path,
            format!("{key} must be true or false, not {other}"),
        )),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, text.as_bytes())
}

impl SentenceTransformerConfig {
    /// Reads `dir`'s `modules.json` and the files it names; `Ok(None)` when the directory has
    /// no `modules.json` (a plain transformers directory).
    ///
    /// The input limit is found as sentence-transformers finds it: `max_seq_length` in
    /// `sentence_bert_config.json` (versions before 6 write it there), else
    /// `tokenizer_config.json`'s `model_max_length` capped at the model's
    /// `max_position_embeddings`.
    ///
    /// Module types other than `Transformer`, `Pooling`, `Dense` and `Normalize`, a
    /// transformer in a sub-folder, or a second pooling module are an [`Error::Checkpoint`]
    /// naming `modules.json`: encoding such a model would silently give other vectors.
    pub fn from_dir(dir: &Path, max_positions: usize) -> Result<Option<Self>> {
        let modules_path = dir.join(MODULES_FILE);
        if !modules_path.is_file() {
            return Ok(None);
        }
        let (modules, pooling_config) = read_modules(dir, &modules_path)?;
        let pooling_path = modules
            .iter()
            .find(|m| matches!(m.kind, ModuleKind::Pooling))
            .map(|m| dir.join(&m.path).join(MODULE_CONFIG_FILE))
            .ok_or_else(|| bad(&modules_path, "no Pooling module"))?;
        let modes = pooling_modes(&pooling_config, &pooling_path)?;
        let include_prompt = match pooling_config.get("include_prompt") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(bad(
                    &pooling_path,
                    format!("include_prompt must be true or false, not {other}"),
                ))
            }
        };
        let sbert_path = dir.join(SENTENCE_BERT_CONFIG_FILE);
        let sentence_bert_config = read_optional_object(&sbert_path)?;
        let max_seq_length = input_limit(&sentence_bert_config, &sbert_path, dir, max_positions)?;
        let do_lower_case = flag(&sentence_bert_config, "do_lower_case", &sbert_path)?;
        let model_path = dir.join(SENTENCE_TRANSFORMERS_CONFIG_FILE);
        let model_config = read_optional_object(&model_path)?;
        let (prompts, default_prompt_name) = read_prompts(&model_config, &model_path)?;
        Ok(Some(Self {
            modules,
            pooling: Pooling::layer(-1).with_modes(modes),
            include_prompt,
            max_seq_length,
            do_lower_case,
            prompts,
            default_prompt_name,
            pooling_config,
            sentence_bert_config,
            model_config,
        }))
    }

    /// Whether the modules end in a `Normalize` (after the last `Dense`), so that vectors are
    /// unit length.
    pub fn normalizes(&self) -> bool {
        self.modules
            .iter()
            .any(|m| matches!(m.kind, ModuleKind::Normalize))
    }

    /// The `Dense` modules, in order.
    pub fn dense(&self) -> impl Iterator<Item = &Dense> {
        self.modules.iter().filter_map(|m| match &m.kind {
            ModuleKind::Dense(dense) => Some(dense),
            _ => None,
        })
    }

    /// Writes `modules.json`, `sentence_bert_config.json`, `config_sentence_transformers.json`
    /// and each module's folder (`1_Pooling/config.json`, the `Dense` weights, an empty
    /// `Normalize` folder) into `dir`, from the current fields: the directory loads in
    /// `SentenceTransformer(dir)` with the same modules. Unknown keys of the files read are
    /// kept. The transformer's own files are [`PretrainedBert::save`]'s.
    ///
    /// [`PretrainedBert::save`]: crate::pretrained::PretrainedBert::save
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut entries = Vec::with_capacity(self.modules.len());
        for (idx, module) in self.modules.iter().enumerate() {
            entries.push(serde_json::json!({
                "idx": idx,
                "name": module.name,
                "path": module.path,
                "type": module.type_name,
            }));
            let folder = dir.join(&module.path);
            if !module.path.is_empty() {
                std::fs::create_dir_all(&folder).map_err(Error::io(&folder))?;
            }
            match &module.kind {
                ModuleKind::Transformer | ModuleKind::Normalize => {}
                ModuleKind::Pooling => write_json(
                    &folder.join(MODULE_CONFIG_FILE),
                    &Value::Object(self.pooling_json()),
                )?,
                ModuleKind::Dense(dense) => dense.save(&folder)?,
            }
        }
        write_json(&dir.join(MODULES_FILE), &Value::Array(entries))?;
        let mut sbert = self.sentence_bert_config.clone();
        sbert.insert(
            "max_seq_length".into(),
            self.max_seq_length.map_or(Value::Null, Value::from),
        );
        sbert.insert("do_lower_case".into(), Value::Bool(self.do_lower_case));
        write_json(&dir.join(SENTENCE_BERT_CONFIG_FILE), &Value::Object(sbert))?;
        let mut model = self.model_config.clone();
        let prompts = self.prompts.iter();
        let prompts = prompts.map(|(k, v)| (k.clone(), Value::String(v.clone())));
        model.insert("prompts".into(), Value::Object(prompts.collect()));
        model.insert(
            "default_prompt_name".into(),
            self.default_prompt_name
                .clone()
                .map_or(Value::Null, Value::String),
        );
        write_json(
            &dir.join(SENTENCE_TRANSFORMERS_CONFIG_FILE),
            &Value::Object(model),
        )
    }

    /// The pooling module's `config.json`: the keys read, with the current modes written the
    /// way the file wrote them (a `pooling_mode` list, or the `pooling_mode_*` flags when they
    /// can express the modes' order).
    fn pooling_json(&self) -> Map<String, Value> {
        let mut config = self.pooling_config.clone();
        let modes = self.pooling.modes();
        let flags_in_order = modes.windows(2).all(|w| w[0] < w[1]);
        if config.contains_key("pooling_mode") || !flags_in_order {
            for mode in PoolingMode::ALL {
                config.remove(mode.config_key());
            }
            let mut names: Vec<Value> = modes.iter().map(|m| Value::from(m.name())).collect();
            let value = match names.len() {
                1 => names.remove(0),
                _ => Value::Array(names),
            };
            config.insert("pooling_mode".into(), value);
        } else {
            for mode in PoolingMode::ALL {
                let on = Value::Bool(modes.contains(&mode));
                config.insert(mode.config_key().into(), on);
            }
        }
        config.insert("include_prompt".into(), Value::Bool(self.include_prompt));
        config
    }
}

/// Reads `modules.json`'s entries and each module's files; returns the modules and the pooling
/// module's configuration.
fn read_modules(dir: &Path, modules_path: &Path) -> Result<(Vec<Module>, Map<String, Value>)> {
    let entries = match read_json(modules_path)? {
        Value::Array(entries) => entries,
        _ => return Err(bad(modules_path, "expected a JSON list of modules")),
    };
    let mut modules = Vec::with_capacity(entries.len());
    let mut pooling = None;
    for (i, entry) in entries.iter().enumerate() {
        let field = |key: &str| -> Result<String> {
            entry
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(modules_path, format!("module {i} has no \"{key}\"")))
        };
        let (type_name, path) = (field("type")?, field("path")?);
        let name = entry
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| i.to_string(), str::to_string);
        let kind = module_kind((i, &type_name, &path), dir, modules_path, &mut pooling)?;
        modules.push(Module {
            name,
            path,
            type_name,
            kind,
        });
    }
    if !matches!(
        modules.first().map(|m| &m.kind),
        Some(ModuleKind::Transformer)
    ) {
        return Err(bad(
            modules_path,
            "the first module must be the Transformer (path \"\")",
        ));
    }
    let Some(pooling_config) = pooling else {
        return Err(bad(
            modules_path,
            "no Pooling module: mlctl needs one to make a sentence vector",
        ));
    };
    Ok((modules, pooling_config))
}

/// Module `i`'s kind, reading its folder's files (the first pooling module's configuration
/// into `pooling`); a module mlctl does not follow is an error naming `modules_path`.
fn module_kind(
    (i, type_name, path): (usize, &str, &str),
    dir: &Path,
    modules_path: &Path,
    pooling: &mut Option<Map<String, Value>>,
) -> Result<ModuleKind> {
    let folder = dir.join(path);
    let short = type_name.rsplit('.').next().unwrap_or(type_name);
    match short {
        "Transformer" if i == 0 && path.is_empty() => Ok(ModuleKind::Transformer),
        "Transformer" => Err(bad(
            modules_path,
            format!(
                "the Transformer must be the first module and live in the directory itself \
                 (path \"\"), not module {i} at \"{path}\""
            ),
        )),
        "Pooling" if pooling.is_none() => {
            *pooling = Some(read_object(&folder.join(MODULE_CONFIG_FILE))?);
            Ok(ModuleKind::Pooling)
        }
        "Dense" => read_dense(&folder).map(ModuleKind::Dense),
        "Normalize" => Ok(ModuleKind::Normalize),
        _ => Err(bad(
            modules_path,
            format!(
                "module {i} ({type_name}) is not supported: mlctl follows Transformer, one \
                 Pooling, Dense and Normalize modules"
            ),
        )),
    }
}

/// The input limit: `max_seq_length` in `sentence_bert_config.json` (`sbert`, read from
/// `sbert_path`), else the tokenizer's `model_max_length` capped at `max_positions`. Also
/// checks that the transformer's pooled output is `last_hidden_state`.
fn input_limit(
    sbert: &Map<String, Value>,
    sbert_path: &Path,
    dir: &Path,
    max_positions: usize,
) -> Result<Option<usize>> {
    if let Some(output) = sbert
        .get("modality_config")
        .and_then(|m| m.get("text"))
        .and_then(|t| t.get("method_output_name"))
    {
        if output != "last_hidden_state" {
            let reason =
                format!("the transformer's text output is {output}; mlctl pools last_hidden_state");
            return Err(bad(sbert_path, reason));
        }
    }
    match sbert.get("max_seq_length") {
        None | Some(Value::Null) => tokenizer_max_length(dir, max_positions),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 2 => Ok(Some(n as usize)),
            _ => Err(bad(
                sbert_path,
                format!("max_seq_length must be a whole number of at least 2, not {v}"),
            )),
        },
    }
}

/// The prompts and the default prompt's name of `config_sentence_transformers.json`.
fn read_prompts(
    config: &Map<String, Value>,
    path: &Path,
) -> Result<(BTreeMap<String, String>, Option<String>)> {
    let mut prompts = BTreeMap::new();
    match config.get("prompts") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, text) in map {
                let text = text
                    .as_str()
                    .ok_or_else(|| bad(path, format!("prompt \"{name}\" is not a string")))?;
                prompts.insert(name.clone(), text.to_string());
            }
        }
        Some(_) => return Err(bad(path, "prompts must be an object")),
    }
    let default_prompt_name = match config.get("default_prompt_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if prompts.contains_key(name) => Some(name.clone()),
        Some(other) => {
            return Err(bad(
                path,
                format!("default_prompt_name {other} is not one of the prompts"),
            ))
        }
    };
    Ok((prompts, default_prompt_name))
}

/// The modes of a pooling config: `pooling_mode` (a name or a list), else the `pooling_mode_*`
/// flags in their order, else the mean (sentence-transformers' default).
fn pooling_modes(config: &Map<String, Value>, path: &Path) -> Result<Vec<PoolingMode>> {
    let parse = |v: &Value| -> Result<PoolingMode> {
        v.as_str()
            .and_then(PoolingMode::from_name)
            .ok_or_else(|| bad(path, format!("unknown pooling_mode {v}")))
    };
    let modes = match config.get("pooling_mode") {
        Some(Value::Array(names)) => names.iter().map(parse).collect::<Result<Vec<_>>>()?,
        Some(Value::Null) | None => {
            let mut modes = Vec::new();
            for mode in PoolingMode::ALL {
                if flag(config, mode.config_key(), path)? {
                    modes.push(mode);
                }
            }
            modes
        }
        Some(name) => vec![parse(name)?],
    };
    if modes.is_empty() {
        return Ok(vec![PoolingMode::Mean]);
    }
    Ok(modes)
}

/// `tokenizer_config.json`'s `model_max_length` capped at `max_position_embeddings`, as
/// sentence-transformers truncates when `sentence_bert_config.json` gives no `max_seq_length`.
fn tokenizer_max_length(dir: &Path, max_position_embeddings: usize) -> Result<Option<usize>> {
    let path = dir.join("tokenizer_config.json");
    let config = read_optional_object(&path)?;
    let limit = config
        .get("model_max_length")
        .and_then(Value::as_f64)
        .filter(|&n| n >= 2.0 && n < max_position_embeddings as f64)
        .map_or(max_position_embeddings, |n| n as usize);
    Ok(Some(limit))
}

fn read_dense(folder: &Path) -> Result<Dense> {
    let config_path = folder.join(MODULE_CONFIG_FILE);
    let config = read_object(&config_path)?;
    let features = |key: &str| -> Result<usize> {
        config
            .get(key)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| bad(&config_path, format!("no whole number \"{key}\"")))
    };
    let (in_features, out_features) = (features("in_features")?, features("out_features")?);
    let has_bias = match config.get("bias") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(
                &config_path,
                format!("bias must be true or false, not {other}"),
            ))
        }
    };
    let activation = match config.get("activation_function") {
        None => Activation::Tanh,
        Some(Value::String(name)) => Activation::from_name(name).ok_or_else(|| {
            bad(
                &config_path,
                format!("activation {name} is not supported (Identity, Tanh, ReLU, Sigmoid, GELU)"),
            )
        })?,
        Some(other) => {
            return Err(bad(
                &config_path,
                format!("activation_function must be a string, not {other}"),
            ))
        }
    };
    let weights_path: PathBuf = folder.join(DENSE_WEIGHTS_FILE);
    if !weights_path.is_file() {
        return Err(bad(
            &weights_path,
            "missing: mlctl reads Dense weights from safetensors only (pytorch_model.bin is a \
             Python pickle)",
        ));
    }
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| {
        bad(
            &weights_path,
            format!("not a readable safetensors file ({e})"),
        )
    })?;
    let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let t = tensors.get(name).ok_or_else(|| Error::MissingTensors {
            names: vec![format!("{}: {name}", weights_path.display())],
        })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    };
    let weight = get("linear.weight", &[out_features, in_features])?;
    let bias = has_bias
        .then(|| get("linear.bias", &[out_features]))
        .transpose()?;
    Ok(Dense {
        weight,
        bias,
        activation,
        config,
    })
}
