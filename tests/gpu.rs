//! CUDA checks, ready for a machine with a GPU:
//! `cargo test --release --features cuda --test gpu -- --ignored`.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, golden};
use mlctl::encoder::PretrainedBert;
use mlctl::loss::CzNce;

fn cuda() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn encoder_on_cuda_matches_transformers() {
    let device = cuda();
    let bert = PretrainedBert::from_dir(&fixture("tiny_bert"), &device, DType::F32).unwrap();
    let g = golden("tiny_bert/golden.safetensors");
    let on = |t: &Tensor| t.to_device(&device).unwrap();
    let out = bert
        .model
        .forward_t(
            &on(&g["input_ids"]),
            Some(&on(&g["token_type_ids"])),
            Some(&on(&g["attention_mask"])),
            false,
        )
        .unwrap();
    for (i, h) in out.encoder.hidden_states.iter().enumerate() {
        assert_close(
            &format!("cuda hidden_states.{i}"),
            &h.to_device(&Device::Cpu).unwrap(),
            &g[&format!("hidden_states.{i}")],
            1e-4,
        );
    }
    assert_close(
        "cuda mlm_logits",
        &out.logits.to_device(&Device::Cpu).unwrap(),
        &g["mlm_logits"],
        1e-4,
    );
    // Dropout draws from the device generator in training.
    let a = bert
        .model
        .encoder
        .forward_t(&on(&g["input_ids"]), None, None, true)
        .unwrap()
        .last_hidden_state;
    let b = bert
        .model
        .encoder
        .forward_t(&on(&g["input_ids"]), None, None, true)
        .unwrap()
        .last_hidden_state;
    assert!(
        common::max_abs_diff(
            &a.to_device(&Device::Cpu).unwrap(),
            &b.to_device(&Device::Cpu).unwrap()
        ) > 1e-4
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cz_nce_on_cuda_matches_the_fused_cpu_op_in_value_and_gradient() {
    let device = cuda();
    let q = Tensor::randn(0f32, 1.0, (64, 96), &Device::Cpu).unwrap();
    let k = Tensor::randn(0f32, 1.0, (64, 96), &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let run = |dev: &Device| {
            let qv =
                candle_core::Var::from_tensor(&q.to_dtype(dtype).unwrap().to_device(dev).unwrap())
                    .unwrap();
            let kv =
                candle_core::Var::from_tensor(&k.to_dtype(dtype).unwrap().to_device(dev).unwrap())
                    .unwrap();
            let loss = CzNce::new()
                .forward(qv.as_tensor(), kv.as_tensor())
                .unwrap();
            let grads = loss.backward().unwrap();
            let cpu = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
            };
            (
                cpu(&loss),
                cpu(grads.get(&qv).unwrap()),
                cpu(grads.get(&kv).unwrap()),
            )
        };
        let (loss_gpu, dq_gpu, dk_gpu) = run(&device);
        let (loss_cpu, dq_cpu, dk_cpu) = run(&Device::Cpu);
        let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
        assert_close(&format!("{dtype:?} loss"), &loss_gpu, &loss_cpu, tol);
        assert_close(&format!("{dtype:?} dq"), &dq_gpu, &dq_cpu, tol);
        assert_close(&format!("{dtype:?} dk"), &dk_gpu, &dk_cpu, tol);
    }
}
