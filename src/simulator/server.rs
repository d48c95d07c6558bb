//! The connection layer. An axum handler cannot close a connection without
//! answering, yet "the charge went through and the answer was lost" is the
//! failure the worker's idempotency exists for. So connections are accepted
//! by hand and served with hyper directly; a response marked
//! [`DropConnection`] turns into a service error, on which hyper closes the
//! connection without writing anything. Every connection task lives in one
//! `JoinSet`, so stopping the server also ends hung requests.

use std::time::Duration;

use axum::Router;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Marker put on a response that must not be sent: the connection is closed
/// instead. Also the service error that makes hyper do so.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("simulated dropped connection")]
pub(crate) struct DropConnection;

/// How long to pause after a failed `accept` (e.g. out of file descriptors)
/// so the loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections until `stop` is cancelled, then closes the listener
/// and aborts every open connection, hung ones included, and waits for them.
pub(crate) async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "simulator accepted a connection");
                    connections.spawn(serve_connection(stream, router.clone()));
                }
                Err(error) => {
                    tracing::debug!(%error, "simulator failed to accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Serves one keep-alive HTTP/1.1 connection with the router.
async fn serve_connection(stream: TcpStream, router: Router) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let router = router.clone();
        async move {
            let response: Response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if response.extensions().get::<DropConnection>().is_some() {
                Err(DropConnection)
            } else {
                Ok(response)
            }
        }
    });
    let connection = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(error) = connection.await {
        tracing::debug!(%error, "simulator connection ended with an error");
    }
}
