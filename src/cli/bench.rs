//! `keybroker bench`: the token's raw seal rate through the HSM layer, without HTTP or
//! Postgres. It only measures: it creates nothing on the token.

use std::time::{Duration, Instant};

use super::BoxError;
use crate::config::TokenArgs;
use crate::crypto::{Aad, DEK_LEN, EncryptionContext, MasterKeyVersion};
use crate::hsm::{self, Hsm};

/// Seals a fresh DEK (token RNG, then AES-GCM under MK v1) as `datakey` does, minus HTTP and
/// Postgres, and prints the rate and latency percentiles: with `concurrency` 0, in tight loops
/// of 1000 inside one blocking call each (the token's own rate); otherwise one [`Hsm::run`] per seal from
/// that many tasks (the HSM layer's rate, thread hand-offs included).
pub(super) async fn bench_token(
    token: TokenArgs,
    seconds: u64,
    concurrency: usize,
) -> Result<(), BoxError> {
    let hsm = Hsm::connect(token.hsm_config()?).await?;
    let version = MasterKeyVersion::FIRST;
    let context = EncryptionContext::default();
    let aad = Aad {
        mk_version: version,
        client_id: None,
        key_ref: None,
        context: &context,
    }
    .bytes();
    let duration = Duration::from_secs(seconds);
    let started = Instant::now();
    let mut all = if concurrency == 0 {
        // Blocks of 1000 seals per call, so that no call outlives the HSM layer's deadline.
        let mut all = Vec::new();
        while started.elapsed() < duration {
            let aad = aad.clone();
            all.extend(
                hsm.run(move |t| {
                    let mut latencies = Vec::with_capacity(1000);
                    for _ in 0..1000 {
                        let one = Instant::now();
                        let dek = t.random(DEK_LEN)?;
                        t.seal(version, &dek, &aad)?;
                        latencies.push(one.elapsed());
                    }
                    Ok(latencies)
                })
                .await?,
            );
        }
        all
    } else {
        let deadline = started + duration;
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let hsm = hsm.clone();
            let aad = aad.clone();
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let aad = aad.clone();
                    let start = Instant::now();
                    hsm.run(move |t| {
                        let dek = t.random(DEK_LEN)?;
                        t.seal(version, &dek, &aad)
                    })
                    .await?;
                    latencies.push(start.elapsed());
                }
                Ok::<_, hsm::HsmError>(latencies)
            }));
        }
        let mut all = Vec::new();
        for worker in workers {
            all.extend(worker.await??);
        }
        all
    };
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        let i = ((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1));
        all.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let mode = if concurrency == 0 {
        "inline".to_owned()
    } else {
        format!("layer concurrency={concurrency}")
    };
    println!(
        "token_seal {mode} ops={} ops_per_s={:.0} p50_us={:.1} p99_us={:.1}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}
