//! The multi-level objective: its total is the sum of its terms, and gradients reach every part.

use crate::common;

use candle_core::Device;
use common::{assert_gradient_reaches, synthetic_tsv, tiny_model, tsv_loader};
use mlctl::data::{MaskKey, MlmMasking};
use mlctl::loss::{masked_lm_loss, CzNce, MaskedPair, MultiLevelLoss};

#[test]
fn total_is_the_sum_of_terms_computed_separately_and_gradients_reach_every_part() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.tsv");
    std::fs::write(&path, synthetic_tsv(8, 1)).unwrap();
    let mut loader = tsv_loader(&path, 8, 16, 0);
    let batch = loader.next_batch(&Device::Cpu).unwrap();
    let model = tiny_model(3);
    let masking = MlmMasking::for_tokenizer(loader.tokenizer())
        .unwrap()
        .with_prob(0.3)
        .unwrap();
    let masked = MaskedPair::draw(&masking, &batch, MaskKey::new(0, 0)).unwrap();
    assert!(!masked.src.is_empty() && !masked.tgt.is_empty());

    let objective = MultiLevelLoss::mlctl().with_word(Some(CzNce::new().with_temperature(0.1)));
    let terms = objective
        .forward(&model, &batch, Some(&masked), false)
        .unwrap();

    // The same terms, assembled by hand from the public pieces.
    let src = model
        .embed(&batch.src, batch.src_spans().as_deref(), false)
        .unwrap();
    let tgt = model
        .embed(&batch.tgt, batch.tgt_spans().as_deref(), false)
        .unwrap();
    let sentence = CzNce::new()
        .forward(&src.projected, &tgt.projected)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let word = CzNce::new()
        .with_temperature(0.1)
        .forward(src.word.as_ref().unwrap(), tgt.word.as_ref().unwrap())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let encoder = model.encoder();
    let mlm_of = |tokens: &mlctl::tokenize::TokenBatch, m: &mlctl::data::MaskedTokens| {
        let out = encoder
            .forward(
                &m.input_ids,
                Some(&tokens.token_type_ids),
                Some(&tokens.attention_mask),
            )
            .unwrap();
        masked_lm_loss(&model.bert.model.mlm_head, &out.last_hidden_state, m)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let mlm = (mlm_of(&batch.src, &masked.src) + mlm_of(&batch.tgt, &masked.tgt)) / 2.0;

    let value = |t: &Option<candle_core::Tensor>| t.as_ref().unwrap().to_scalar::<f32>().unwrap();
    assert!((value(&terms.sentence) - sentence).abs() < 1e-5);
    assert!((value(&terms.word) - word).abs() < 1e-5);
    assert!((value(&terms.mlm) - mlm).abs() < 1e-5);
    let total = terms.total.to_scalar::<f32>().unwrap();
    assert!(
        (total - (sentence + word + 0.1 * mlm)).abs() < 1e-4,
        "{total} vs {}",
        sentence + word + 0.1 * mlm
    );
    assert!(
        mlm > 3.0,
        "an untrained MLM over 113 words should be near ln(113) = 4.7, got {mlm}"
    );

    let grads = terms.total.backward().unwrap();
    let vars = model.named_vars();
    for name in [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.output.LayerNorm.weight",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.bias",
        "mlctl.projection.fc1.weight",
        "mlctl.projection.fc2.bias",
    ] {
        assert_gradient_reaches(&grads, vars[name].as_tensor(), name);
    }
}

#[test]
fn terms_can_be_used_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.tsv");
    std::fs::write(&path, synthetic_tsv(4, 2)).unwrap();
    let batch = tsv_loader(&path, 4, 16, 0)
        .next_batch(&Device::Cpu)
        .unwrap();
    let model = tiny_model(3);
    let sentence_only = MultiLevelLoss::mlctl().with_mlm_weight(None);
    let terms = sentence_only.forward(&model, &batch, None, false).unwrap();
    assert!(terms.mlm.is_none() && terms.word.is_none());
    assert_eq!(
        terms.total.to_scalar::<f32>().unwrap(),
        terms.sentence.unwrap().to_scalar::<f32>().unwrap()
    );
    // The MLM term without masked copies, and an objective with nothing on, are typed errors.
    assert!(matches!(
        MultiLevelLoss::mlctl().forward(&model, &batch, None, false),
        Err(mlctl::Error::InvalidArgument(_))
    ));
    let nothing = MultiLevelLoss::mlctl()
        .with_sentence(None)
        .with_mlm_weight(None);
    assert!(matches!(
        nothing.forward(&model, &batch, None, false),
        Err(mlctl::Error::InvalidArgument(_))
    ));
}

#[test]
fn the_word_weight_scales_the_word_terms_value_and_gradient_and_nothing_else() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.tsv");
    std::fs::write(&path, synthetic_tsv(8, 5)).unwrap();
    let batch = tsv_loader(&path, 8, 16, 0)
        .next_batch(&Device::Cpu)
        .unwrap();
    let model = tiny_model(3);
    let vars = model.named_vars();
    let word = Some(CzNce::new().with_temperature(0.1));
    // Value and gradients of one objective, MLM off.
    let run = |objective: MultiLevelLoss| {
        let terms = objective
            .with_mlm_weight(None)
            .forward(&model, &batch, None, false)
            .unwrap();
        let store = terms.total.backward().unwrap();
        let grads: BTreeMap<_, _> = vars
            .iter()
            .filter_map(|(n, v)| store.get(v).map(|g| (n.clone(), g.clone())))
            .collect();
        (terms.total.to_scalar::<f32>().unwrap(), grads)
    };
    // The independent reference: each term alone.
    let (sentence, d_sentence) = run(MultiLevelLoss::mlctl());
    let (word_alone, d_word) = run(MultiLevelLoss::mlctl()
        .with_sentence(None)
        .with_word(word.clone()));
    let w = 0.25;
    let (total, d_total) = run(MultiLevelLoss::mlctl()
        .with_word(word.clone())
        .with_word_weight(w));
    let want = sentence + w as f32 * word_alone;
    assert!((total - want).abs() < 1e-5, "{total} vs {want}");
    // The weighted total's backward and the two terms' backward sum the same f32
    // contributions in other orders: some n·u (u = 2⁻²⁴, a few hundred terms per element) of
    // the gradients' scale apart, the largest element over every parameter (some elements,
    // such as the key bias's, are zero up to rounding). A weight ignored or applied twice is
    // off by a quarter to three quarters of the word term's gradient.
    let wanted: BTreeMap<_, _> = d_total
        .keys()
        .map(|name| {
            let want = match d_word.get(name) {
                Some(dw) => (&d_sentence[name] + (dw * w).unwrap()).unwrap(),
                None => d_sentence[name].clone(),
            };
            (name.clone(), want)
        })
        .collect();
    let scale = wanted
        .values()
        .map(|g| common::max_abs_diff(g, &g.zeros_like().unwrap()))
        .fold(0f64, common::nan_max);
    for (name, want) in &wanted {
        let diff = common::max_abs_diff(&d_total[name], want);
        assert!(diff <= 1e-5 * scale, "{name}: {diff:e} of {scale:e}");
    }
    // Weights that are not a finite non-negative number are refused.
    for bad in [-0.5, f64::NAN, f64::INFINITY] {
        let objective = MultiLevelLoss::mlctl()
            .with_word(word.clone())
            .with_word_weight(bad)
            .with_mlm_weight(None);
        match objective.forward(&model, &batch, None, false) {
            Err(mlctl::Error::InvalidArgument(m)) => assert!(m.contains("weight"), "{m}"),
            other => panic!("weight {bad}: {:?}", other.map(|t| t.total)),
        }
    }
}
