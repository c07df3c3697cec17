use std::sync::atomic::Ordering;

use clap::Parser;
use dispute_processor::{Processor, ProcessorArgs};
use trellis_domain::flags::{Executor, Flag};
use trellis_runtime::health::Severity;
use trellis_runtime::worker::{self, WorkerArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "dispute-processor",
    version,
    about = "Drains disputes strictly by priority and auto-adjudicates them"
)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,

    #[command(flatten)]
    processor: ProcessorArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let processor_args = args.processor;
    worker::main("dispute-processor", args.worker, move |w| {
        Box::pin(async move {
            let processor = Processor::new(w.pool.clone(), processor_args);
            let gate = w.flags.gate(Flag::DisputeExecutor, Executor::Worker);
            let groups = processor.groups(w.ctx.clone(), w.args.runner_config()).gated(gate.clone());
            for (name, bound, standing_by) in groups.readiness_flags() {
                let gate = gate.clone();
                w.health.add(format!("consumer {name}"), Severity::Critical, move || {
                    // A group starts once the priority above it pulls, so while the flag names
                    // the other side only P0's groups run (and stand by); the others are not
                    // started, and stand by just as well.
                    let executing = *gate.borrow();
                    let ok = bound.load(Ordering::Acquire) || standing_by.load(Ordering::Acquire) || !executing;
                    async move { if ok { Ok(()) } else { Err("not bound yet".to_owned()) } }
                });
            }
            let stop = w.stop_token();
            w.spawn_task("dispute-processor", async move { groups.run(stop).await.map_err(Into::into) });
            Ok(())
        })
    })
    .await
}
