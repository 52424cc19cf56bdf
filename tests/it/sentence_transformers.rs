//! sentence-transformers model directories: `PretrainedBert::encode` on a directory saved by
//! `SentenceTransformer.save` gives the vectors `SentenceTransformer.encode` gave
//! (`tests/fixtures/st_golden.safetensors`, made by `make_st_fixtures.py`).
//!
//! Tolerance: the tiny BERT's hidden states agree with PyTorch's to about 1.2e-6 (f32, the
//! parity table in the README). A mean or a CLS pick does not grow that error; `Normalize`
//! divides it by the vector's norm (about 5 here); the `Dense` layer (32 inputs, weights below
//! 0.18 in magnitude, tanh) can add at most 32 * 0.18 * 1.2e-6 ≈ 7e-6 and typically a tenth of
//! it, since rounding errors do not all line up. Measured: at most 1.4e-7 (mean, Normalize) and
//! 6.9e-7 (CLS, Dense). 1e-5 holds every case with room, and stays far below what ignoring a
//! setting moves (asserted below: above 1e-2).

use crate::common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, max_abs_diff};
use mlctl::encode::EncodeOptions;
use mlctl::pooling::{Pooling, PoolingMode};
use mlctl::pretrained::PretrainedBert;
use mlctl::sentence_transformers::{ModuleKind, SentenceTransformerConfig};
use mlctl::Error;

const TOL: f64 = 1e-5;

fn load(name: &str) -> PretrainedBert {
    PretrainedBert::from_dir(&fixture(name), &Device::Cpu, DType::F32).unwrap()
}

/// The golden vectors and the sentences they were made from.
fn golden() -> (std::collections::HashMap<String, Tensor>, Vec<String>) {
    let path = fixture("st_golden.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let sentences = metadata.metadata().as_ref().unwrap()["sentences"].clone();
    let sentences: Vec<String> = serde_json::from_str(&sentences).unwrap();
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    (tensors, sentences)
}

#[test]
fn mean_pooling_normalize_and_max_seq_length_match_sentence_transformers() {
    let bert = load("st_mean");
    let st = bert
        .sentence_transformer
        .as_ref()
        .expect("modules.json read");
    assert_eq!(st.pooling.modes(), [PoolingMode::Mean]);
    assert!(st.normalizes());
    assert_eq!(st.max_seq_length, Some(8));
    assert_eq!(bert.tokenizer().unwrap().max_len(), 8);
    let (g, sentences) = golden();
    let want = &g["st_mean.default"];
    for batch_size in [1, 4, 32] {
        let got = bert
            .encode(
                &sentences,
                &EncodeOptions::default().with_batch_size(batch_size),
            )
            .unwrap();
        assert_close(&format!("st_mean, batch {batch_size}"), &got, want, TOL);
    }
    // Each setting matters on this fixture: ignoring it moves the vectors well past TOL.
    let moved = |name: &str, options: EncodeOptions| {
        let got = bert.encode(&sentences, &options).unwrap();
        let diff = max_abs_diff(&got, want);
        assert!(diff > 1e-2, "{name}: only {diff:e} from the golden vectors");
    };
    moved(
        "not normalised",
        EncodeOptions::default().with_normalize(false),
    );
    moved(
        "not truncated at 8",
        EncodeOptions::default().with_max_len(64),
    );
    moved(
        "ML-CTL's pooling",
        EncodeOptions::default().with_pooling(Pooling::mlctl()),
    );
    moved(
        "CLS pooling",
        EncodeOptions::default().with_pooling(Pooling::layer(-1).with_modes([PoolingMode::Cls])),
    );
}

#[test]
fn cls_pooling_dense_and_prompts_match_sentence_transformers() {
    let bert = load("st_cls_dense");
    let st = bert
        .sentence_transformer
        .as_ref()
        .expect("modules.json read");
    assert_eq!(st.pooling.modes(), [PoolingMode::Cls]);
    assert!(!st.include_prompt);
    assert!(!st.normalizes());
    assert_eq!(st.dense().count(), 1);
    assert_eq!(st.default_prompt_name.as_deref(), Some("query"));
    assert_eq!(st.prompts["passage"], "passage: ");
    let (g, sentences) = golden();
    let cases = [
        ("default", EncodeOptions::default()),
        (
            "passage",
            EncodeOptions::default().with_prompt_name("passage"),
        ),
        ("no_prompt", EncodeOptions::default().with_prefix("")),
    ];
    for (name, options) in &cases {
        let got = bert.encode(&sentences, options).unwrap();
        assert_eq!(got.dims(), [sentences.len(), 16]);
        assert_close(name, &got, &g[&format!("st_cls_dense.{name}")], TOL);
    }
    let want = &g["st_cls_dense.default"];
    let moved = |name: &str, options: EncodeOptions| {
        let got = bert.encode(&sentences, &options).unwrap();
        let diff = if got.dims() == want.dims() {
            max_abs_diff(&got, want)
        } else {
            f64::INFINITY
        };
        assert!(diff > 1e-2, "{name}: only {diff:e} from the golden vectors");
    };
    moved(
        "mean instead of CLS",
        EncodeOptions::default().with_pooling(Pooling::layer(-1)),
    );
    moved(
        "prompt pooled",
        EncodeOptions::default().with_include_prompt(true),
    );
    moved("no Dense", EncodeOptions::default().with_dense(false));
    moved("normalised", EncodeOptions::default().with_normalize(true));
}

#[test]
fn unknown_prompt_name_is_an_invalid_argument() {
    let bert = load("st_cls_dense");
    let err = bert
        .encode(
            &["a bird"],
            &EncodeOptions::default().with_prompt_name("title"),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("query") && m.contains("title")),
        "{err}"
    );
    let plain = load("tiny_bert");
    assert!(plain.sentence_transformer.is_none());
    let err = plain
        .encode(
            &["a bird"],
            &EncodeOptions::default().with_prompt_name("query"),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

/// Copies `from`'s files (not sub-folders) into `to`.
fn copy_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The files sentence-transformers 2 to 5 wrote: `pooling_mode_*` flags,
/// `max_seq_length` and `do_lower_case` in `sentence_bert_config.json`, older class paths.
#[test]
fn older_sentence_transformers_files_are_read() {
    let dir = tempfile::tempdir().unwrap();
    copy_files(&fixture("tiny_bert"), dir.path());
    std::fs::remove_file(dir.path().join("golden.safetensors")).unwrap();
    write(
        &dir.path().join("modules.json"),
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
            {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
    );
    write(
        &dir.path().join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension":32,"pooling_mode_cls_token":false,
            "pooling_mode_mean_tokens":true,"pooling_mode_max_tokens":true,
            "pooling_mode_mean_sqrt_len_tokens":false}"#,
    );
    write(
        &dir.path().join("sentence_bert_config.json"),
        r#"{"max_seq_length": 6, "do_lower_case": true}"#,
    );
    let bert = PretrainedBert::from_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let st = bert.sentence_transformer.as_ref().unwrap();
    // Flags in sentence-transformers' order: max before mean.
    assert_eq!(st.pooling.modes(), [PoolingMode::Max, PoolingMode::Mean]);
    assert!(st.include_prompt);
    assert_eq!(st.max_seq_length, Some(6));
    assert!(st.do_lower_case);
    let v = bert
        .encode(&["A BIRD sings", "a bird sings"], &EncodeOptions::default())
        .unwrap();
    assert_eq!(v.dims(), [2, 64]);
    // Lower-cased, so both texts give one vector (of unit length).
    assert_close("lower-cased", &v.get(0).unwrap(), &v.get(1).unwrap(), 1e-6);
    let norm: f32 = v
        .get(0)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    // Saved back in the same style, the files read the same.
    let out = tempfile::tempdir().unwrap();
    bert.save(out.path()).unwrap();
    let pooling: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("1_Pooling/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(pooling["pooling_mode_max_tokens"], true);
    assert_eq!(pooling["word_embedding_dimension"], 32);
    let again = SentenceTransformerConfig::from_dir(out.path(), 64)
        .unwrap()
        .unwrap();
    assert_eq!(again.pooling, st.pooling);
    assert_eq!(again.max_seq_length, Some(6));
    assert!(again.do_lower_case && again.normalizes());
}

#[test]
fn unsupported_modules_are_refused_naming_modules_json() {
    let dir = tempfile::tempdir().unwrap();
    copy_files(&fixture("tiny_bert"), dir.path());
    write(
        &dir.path().join("modules.json"),
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_LSTM","type":"sentence_transformers.models.LSTM"}]"#,
    );
    let err = PretrainedBert::from_dir(dir.path(), &Device::Cpu, DType::F32).unwrap_err();
    match err {
        Error::Checkpoint { path, reason } => {
            assert!(path.ends_with("modules.json"), "{}", path.display());
            assert!(reason.contains("LSTM"), "{reason}");
        }
        other => panic!("expected a checkpoint error, got {other}"),
    }
}

/// A model changed after loading (as training changes it) and saved: the directory keeps its
/// sentence-transformers files, and loading it again gives the changed model's vectors.
fn fine_tuned(name: &str) -> (PretrainedBert, tempfile::TempDir) {
    let bert = load(name);
    let vars = bert.params.named_vars();
    let var = &vars["bert.encoder.layer.1.output.dense.weight"];
    var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = mlctl::model::MlCtlModel::new(bert, Default::default(), 0).unwrap();
    model.save(dir.path()).unwrap();
    (model.bert, dir)
}

#[test]
fn saved_fine_tuned_model_keeps_its_sentence_transformers_files() {
    let (_, sentences) = golden();
    for name in ["st_mean", "st_cls_dense"] {
        let (bert, dir) = fine_tuned(name);
        for file in [
            "modules.json",
            "sentence_bert_config.json",
            "config_sentence_transformers.json",
            "1_Pooling/config.json",
        ] {
            assert!(dir.path().join(file).is_file(), "{name}: no {file}");
        }
        let before = bert.encode(&sentences, &EncodeOptions::default()).unwrap();
        let reloaded = PretrainedBert::from_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let after = reloaded
            .encode(&sentences, &EncodeOptions::default())
            .unwrap();
        assert_close(name, &after, &before, 1e-6);
        let (g, _) = golden();
        let diff = max_abs_diff(&after, &g[&format!("{name}.default")]);
        assert!(
            diff > 1e-3,
            "{name}: the change did not reach the vectors ({diff:e})"
        );
        let kinds: Vec<&str> = reloaded
            .sentence_transformer
            .as_ref()
            .unwrap()
            .modules
            .iter()
            .map(|m| match m.kind {
                ModuleKind::Transformer => "transformer",
                ModuleKind::Pooling => "pooling",
                ModuleKind::Dense(_) => "dense",
                ModuleKind::Normalize => "normalize",
            })
            .collect();
        let want: &[&str] = if name == "st_mean" {
            &["transformer", "pooling", "normalize"]
        } else {
            &["transformer", "pooling", "dense"]
        };
        assert_eq!(kinds, want, "{name}");
    }
}

/// The saved directory of a changed model loads in `SentenceTransformer(dir)`, whose `encode`
/// gives mlctl's vectors. Set `MLCTL_PYTHON` to a Python with sentence-transformers.
#[test]
#[ignore = "needs MLCTL_PYTHON with torch and sentence-transformers"]
fn saved_fine_tuned_model_loads_in_sentence_transformers() {
    let python = std::env::var("MLCTL_PYTHON").expect("set MLCTL_PYTHON");
    let (_, sentences) = golden();
    for name in ["st_mean", "st_cls_dense"] {
        let (bert, dir) = fine_tuned(name);
        let ours = bert.encode(&sentences, &EncodeOptions::default()).unwrap();
        let path = dir.path().join("ours.safetensors");
        let mut metadata = std::collections::HashMap::new();
        metadata.insert(
            "sentences".to_string(),
            serde_json::to_string(&sentences).unwrap(),
        );
        let data: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            ours.dims().to_vec(),
            &bytes,
        )
        .unwrap();
        safetensors::tensor::serialize_to_file([("vectors", view)], Some(metadata), &path).unwrap();
        let status = std::process::Command::new(&python)
            .arg(fixture("check_st_load.py"))
            .arg(dir.path())
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "{name}: SentenceTransformer disagreed");
    }
}
