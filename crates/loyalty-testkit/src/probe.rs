//! A streaming RPC for tests (`loyalty.testkit.v1.ProbeService/Ticks`): the server's limits for
//! long-lived streams are tested with it until the event stream exists. Declared like any
//! feature's service (an authenticated stream), and added with `Options::streaming_probe`.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use loyalty::{Access, Declaration, Method, Scope, Service};
use tonic::{Request, Response, Status};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("loyalty.testkit.v1");
}

use pb::probe_service_server::{ProbeService, ProbeServiceServer, SERVICE_NAME};

pub const DECLARATION: Declaration = Declaration {
    name: SERVICE_NAME,
    methods: &[Method::streaming(
        "Ticks",
        Access::Scopes(&[Scope::App, Scope::Pos, Scope::Admin]),
    )],
};

pub type ProbeClient<T> = pb::probe_service_client::ProbeServiceClient<T>;

/// The probe, ready for `Application::with_service`.
pub fn service() -> Service {
    Service::new(DECLARATION, ProbeServiceServer::new(Probe))
}

struct Probe;

type Ticks = Pin<Box<dyn Stream<Item = Result<pb::Tick, Status>> + Send>>;

#[tonic::async_trait]
impl ProbeService for Probe {
    type TicksStream = Ticks;

    async fn ticks(
        &self,
        request: Request<pb::TicksRequest>,
    ) -> Result<Response<Self::TicksStream>, Status> {
        let r = request.into_inner();
        let interval = Duration::from_millis(u64::from(r.interval_ms.max(1)));
        let count = u64::from(r.count);
        let ticks = futures::stream::unfold(0u64, move |seq| async move {
            if count != 0 && seq >= count {
                return None;
            }
            tokio::time::sleep(interval).await;
            Some((Ok(pb::Tick { seq }), seq + 1))
        });
        Ok(Response::new(Box::pin(ticks)))
    }
}
