//! The API's routes. Each change is one [`Edit`] sent to the controller,
//! after the MACs of the reals it adds were looked up here (so the
//! controller never waits on ARP); each read joins the controller's snapshot
//! with the counters.

use std::{net::IpAddr, time::Duration};

use axum::{
    Json, Router,
    extract::{
        Path, Query, State as AxState,
        rejection::{JsonRejection, QueryRejection},
    },
    http::StatusCode,
    routing::{delete, get, post, put},
};
use lb_common::{flow_hash, src_hash, stat};
use serde::Deserialize;

use super::{
    AddReal, AddVip, ApiError, Applied, ApplyBody, Conntrack, Context, DesiredQuery, EventStat,
    NoBody, Planned, RealHealth, SetReal, SetVip, SimulateBatch, Simulated, SimulatedBatch, Stats,
    Status, VerdictStat, VipStatus, zero::Zeroed,
};
use crate::{
    config::Config,
    controller::unix_now,
    desired::{Desired, Edit, Spec, SpecError, VipOptions},
    model::{Proto, Scheduler, Vip, addr_bytes},
    neighbor::{self, Resolution},
    views::{self, VipView},
};

type ApiResult<T> = Result<T, ApiError>;

/// The API's routes over `ctx`.
pub fn router(ctx: Context) -> Router {
    Router::new()
        .route("/v1/vips", get(list_vips).post(add_vip))
        .route(
            "/v1/vips/{proto}/{addr}/{port}",
            get(get_vip).delete(del_vip).put(set_vip),
        )
        .route("/v1/vips/{proto}/{addr}/{port}/reals", post(add_real))
        .route(
            "/v1/vips/{proto}/{addr}/{port}/reals/{real}",
            delete(del_real).put(set_real),
        )
        .route(
            "/v1/vips/{proto}/{addr}/{port}/reals/{real}/override",
            delete(reset_override),
        )
        .route("/v1/desired", put(apply).get(desired))
        .route("/v1/desired/plan", post(plan))
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/stats/zero", post(zero))
        .route("/v1/simulate", get(simulate).post(simulate_batch))
        .route("/v1/fleet", get(fleet))
        .route("/v1/node", get(super::node::status))
        .route(
            "/v1/node/drain",
            post(super::node::drain).delete(super::node::undrain),
        )
        .route("/v1/node/role", put(super::node::role))
        .layer(axum::extract::DefaultBodyLimit::max(super::MAX_BODY_BYTES))
        .with_state(ctx)
}

fn parse_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(e.to_string())
}

fn vip_from_path(proto: &str, addr: &str, port: &str) -> ApiResult<Vip> {
    let proto: Proto = proto.parse().map_err(parse_err)?;
    let addr: IpAddr = crate::model::parse_real(addr).map_err(parse_err)?;
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(ApiError::bad_request(format!(
                "invalid port '{port}': out of range (1-65535)"
            )));
        }
    };
    Ok(Vip { addr, port, proto })
}

/// Every VIP's view, with the last conntrack count (never waits for a walk),
/// counted from the last zero.
fn all_views(ctx: &Context) -> ApiResult<Vec<VipView>> {
    let flows = ctx.sources.flows.last();
    let mut views = views::vips(&ctx.sources.handle.snapshot(), &ctx.sources.reader, &flows)?;
    ctx.baseline.views(&mut views);
    Ok(views)
}

fn view_of(ctx: &Context, vip: &Vip) -> ApiResult<VipView> {
    views::find(all_views(ctx)?, vip).ok_or_else(|| SpecError::UnknownVip(*vip).into())
}

/// Looks up the MACs of the reals `desired` adds that the controller does
/// not know yet (waiting at most the resolve timeout). A real that does not
/// answer is left to the controller, which keeps it unresolved and retries.
async fn resolve(ctx: &Context, desired: &Desired) -> Resolution {
    let snap = ctx.sources.handle.snapshot();
    let mut unknown = desired.reach();
    unknown.retain(|real, _| !snap.macs.contains_key(real));
    if unknown.is_empty() {
        return Resolution::default();
    }
    neighbor::resolve_all(&ctx.iface.refreshed(), &unknown, ctx.resolve_timeout).await
}

async fn edit(ctx: &Context, edit: Edit, adds: Option<&Desired>) -> ApiResult<Applied> {
    edit_at(ctx, edit, adds, None).await
}

/// Applies `edit`: through the controller, or in store mode by writing the
/// store (only if its desired state is still at `if_revision`, when given).
async fn edit_at(
    ctx: &Context,
    edit: Edit,
    adds: Option<&Desired>,
    if_revision: Option<i64>,
) -> ApiResult<Applied> {
    if let Some(store) = &ctx.store {
        let w = store.change(&ctx.iface, edit, if_revision).await?;
        return Ok(Applied {
            writes: w.writes,
            tables: w.tables,
            revision: Some(w.revision),
        });
    }
    revision_needs_store(ctx, if_revision)?;
    let resolution = match adds {
        Some(d) => resolve(ctx, d).await,
        None => Resolution::default(),
    };
    Ok(ctx.sources.handle.edit(edit, resolution).await?.into())
}

/// Refuses a revision without a store: only a store has revisions to
/// compare with.
fn revision_needs_store(ctx: &Context, revision: Option<i64>) -> ApiResult<()> {
    if ctx.store.is_none() && revision.is_some() {
        return Err(ApiError::bad_request(
            "a revision is only checked in store mode (xlb run --store)",
        ));
    }
    Ok(())
}

async fn list_vips(AxState(ctx): AxState<Context>, _: NoBody) -> ApiResult<Json<Vec<VipView>>> {
    Ok(Json(all_views(&ctx)?))
}

async fn get_vip(
    AxState(ctx): AxState<Context>,
    Path((proto, addr, port)): Path<(String, String, String)>,
    _: NoBody,
) -> ApiResult<Json<VipView>> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    Ok(Json(view_of(&ctx, &vip)?))
}

async fn add_vip(
    AxState(ctx): AxState<Context>,
    body: Result<Json<AddVip>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<VipView>)> {
    let Json(body) = body?;
    let vip: Vip = body.vip.parse().map_err(parse_err)?;
    let mut options = VipOptions::default();
    if let Some(s) = &body.scheduler {
        options.scheduler = s.parse().map_err(parse_err)?;
    }
    if let Some(size) = body.table_size {
        options.table_size = size;
    }
    if let Some(f) = &body.forward {
        options.forward = f.parse().map_err(parse_err)?;
    }
    if let Some(hc) = &body.health_check {
        hc.validate()
            .map_err(|e| ApiError::bad_request(format!("health_check: {e}")))?;
    }
    let e = Edit::AddVip {
        vip,
        options,
        health: body.health_check,
    };
    edit(&ctx, e, None).await?;
    Ok((StatusCode::CREATED, Json(view_of(&ctx, &vip)?)))
}

async fn set_vip(
    AxState(ctx): AxState<Context>,
    Path((proto, addr, port)): Path<(String, String, String)>,
    body: Result<Json<SetVip>, JsonRejection>,
) -> ApiResult<Json<VipView>> {
    let Json(body) = body?;
    let vip = vip_from_path(&proto, &addr, &port)?;
    let scheduler = body
        .scheduler
        .as_deref()
        .map(str::parse::<Scheduler>)
        .transpose()
        .map_err(parse_err)?;
    if let Some(hc) = &body.health_check {
        hc.validate()
            .map_err(|e| ApiError::bad_request(format!("health_check: {e}")))?;
    }
    let e = Edit::SetVip {
        vip,
        scheduler,
        table_size: body.table_size,
        health: body.health_check,
    };
    edit(&ctx, e, None).await?;
    Ok(Json(view_of(&ctx, &vip)?))
}

async fn del_vip(
    AxState(ctx): AxState<Context>,
    Path((proto, addr, port)): Path<(String, String, String)>,
    _: NoBody,
) -> ApiResult<StatusCode> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    edit(&ctx, Edit::DelVip(vip), None).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn add_real(
    AxState(ctx): AxState<Context>,
    Path((proto, addr, port)): Path<(String, String, String)>,
    body: Result<Json<AddReal>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<VipView>)> {
    let Json(body) = body?;
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real = crate::model::parse_real(&body.addr).map_err(parse_err)?;
    let weight = body.weight.unwrap_or(1);
    let e = Edit::AddReal { vip, real, weight };
    // Refuse early what would be refused anyway, before waiting on ARP; the
    // edit and the check against what runs are made on one snapshot.
    let current = ctx.sources.handle.snapshot();
    let mut preview = Spec::clone(&current.spec);
    preview.apply(e.clone())?;
    let desired = preview.effective();
    crate::controller::check_host(&ctx.iface, &desired, current.desired())
        .await
        .map_err(crate::controller::ControlError::from)?;
    let mut adds = Desired::default();
    if let Some(s) = desired.services.get(&vip) {
        let mut s = s.clone();
        s.reals.retain(|r, _| *r == real);
        adds.services.insert(vip, s);
    }
    edit(&ctx, e, Some(&adds)).await?;
    Ok((StatusCode::CREATED, Json(view_of(&ctx, &vip)?)))
}

async fn set_real(
    AxState(ctx): AxState<Context>,
    Path((proto, addr, port, real)): Path<(String, String, String, String)>,
    body: Result<Json<SetReal>, JsonRejection>,
) -> ApiResult<Json<VipView>> {
    let Json(body) = body?;
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real = crate::model::parse_real(&real).map_err(parse_err)?;
    let e = Edit::SetReal {
        vip,
        real,
        weight: body.weight,
        admin: body.admin,
    };
    edit(&ctx, e, None).await?;
    Ok(Json(view_of(&ctx, &vip)?))
}

async fn reset_override(
    AxState(ctx): AxState<Context>,
    Path((proto, addr, port, real)): Path<(String, String, String, String)>,
    _: NoBody,
) -> ApiResult<Json<VipView>> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real = crate::model::parse_real(&real).map_err(parse_err)?;
    edit(&ctx, Edit::ResetOverride { vip, real }, None).await?;
    Ok(Json(view_of(&ctx, &vip)?))
}

async fn del_real(
    AxState(ctx): AxState<Context>,
    Path((proto, addr, port, real)): Path<(String, String, String, String)>,
    _: NoBody,
) -> ApiResult<StatusCode> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real = crate::model::parse_real(&real).map_err(parse_err)?;
    edit(&ctx, Edit::DelReal { vip, real }, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An apply body parsed and checked the way `PUT /v1/desired` applies it:
/// the file's name and its services. Errors name the file.
async fn checked(ctx: &Context, body: &ApplyBody) -> ApiResult<(String, Desired)> {
    let file = body.file.clone().unwrap_or_else(|| "request".to_owned());
    let config = Config::parse(&file, &body.yaml).map_err(parse_err)?;
    if config.daemon.store.is_some() {
        // A store-mode node's own configuration file (e.g. what the unit's
        // `systemctl reload` applies) holds no services: applying it would
        // replace the desired state, the fleet's in store mode, with nothing.
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "{file} sets daemon.store: it configures a node whose desired state comes from \
                 the store, not services to apply; nothing applied (apply a services file; \
                 daemon settings change with a restart)"
            ),
        });
    }
    let current = ctx.sources.handle.snapshot();
    crate::controller::check_host(&ctx.iface, &config.desired, current.desired())
        .await
        .map_err(|e| named(&file, crate::controller::ControlError::from(e).into()))?;
    Ok((file, config.desired))
}

/// `e` with its message prefixed by `file` (errors only the daemon can see).
fn named(file: &str, e: ApiError) -> ApiError {
    ApiError {
        status: e.status,
        message: format!("{file}: {}", e.message),
    }
}

async fn apply(
    AxState(ctx): AxState<Context>,
    body: Result<Json<ApplyBody>, JsonRejection>,
) -> ApiResult<Json<Applied>> {
    // A body refused before it is read (too big, not JSON) is a failed reload too.
    let body = match body {
        Ok(Json(body)) => body,
        Err(rejection) => {
            let err = ApiError::from(rejection);
            let source = "xlb apply (request)".to_owned();
            ctx.sources
                .activity
                .record_reload(source, Err(err.to_string()));
            return Err(err);
        }
    };
    let source = format!("xlb apply {}", body.file.as_deref().unwrap_or("(request)"));
    let result = apply_checked(&ctx, &body).await;
    let outcome = result.as_ref().map(drop).map_err(ToString::to_string);
    ctx.sources.activity.record_reload(source, outcome);
    result.map(Json)
}

async fn apply_checked(ctx: &Context, body: &ApplyBody) -> ApiResult<Applied> {
    let (file, desired) = checked(ctx, body).await?;
    let applied = edit_at(
        ctx,
        Edit::Replace(desired.clone()),
        Some(&desired),
        body.revision,
    )
    .await
    .map_err(|e| named(&file, e))?;
    tracing::info!(
        file,
        writes = applied.writes,
        tables = applied.tables,
        "desired state applied"
    );
    Ok(applied)
}

async fn plan(
    AxState(ctx): AxState<Context>,
    body: Result<Json<ApplyBody>, JsonRejection>,
) -> ApiResult<Json<Planned>> {
    let Json(body) = body?;
    let (file, desired) = checked(&ctx, &body).await?;
    revision_needs_store(&ctx, body.revision)?;
    if let Some(store) = &ctx.store {
        // A plan against a state that is no longer the store's would show
        // the wrong changes: refused as `PUT /v1/desired` refuses it.
        store
            .check_revision(body.revision)
            .map_err(|e| named(&file, crate::store::api::ChangeError::from(e).into()))?;
    }
    let snap = ctx.sources.handle.snapshot();
    let mut next = Spec::clone(&snap.spec);
    next.apply(Edit::Replace(desired))
        .map_err(|e| named(&file, e.into()))?;
    Ok(Json(Planned {
        changes: crate::diff::diff(snap.desired(), &next.effective()),
    }))
}

async fn desired(
    AxState(ctx): AxState<Context>,
    q: Result<Query<DesiredQuery>, QueryRejection>,
    _: NoBody,
) -> ApiResult<Json<Desired>> {
    let Query(q) = q?;
    let snap = ctx.sources.handle.snapshot();
    match q.layer.as_deref() {
        None | Some("effective") => Ok(Json(snap.desired().clone())),
        Some("base") => Ok(Json(snap.spec.base.clone())),
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid layer '{other}': expected base or effective"
        ))),
    }
}

async fn status(AxState(ctx): AxState<Context>, _: NoBody) -> ApiResult<Json<Status>> {
    let snap = ctx.sources.handle.snapshot();
    let flows = ctx.sources.flows.fresh(Duration::ZERO).await;
    let mut views = views::vips(&snap, &ctx.sources.reader, &flows)?;
    ctx.baseline.views(&mut views);
    let statuses = ctx.sources.board.statuses();
    let vips = views
        .into_iter()
        .map(|view| {
            let model = snap.vips.iter().find(|v| v.vip == view.vip);
            let health = view
                .reals
                .iter()
                .map(|r| {
                    let real = model.and_then(|m| m.reals.iter().find(|x| x.addr == r.addr));
                    let check = real.and_then(|x| x.check);
                    RealHealth {
                        addr: r.addr,
                        check: check
                            .map_or_else(|| "none".to_owned(), |k| format!("{k:?}").to_lowercase()),
                        mode: real.and_then(|x| x.check_mode),
                        via: real.map(|x| x.via).unwrap_or_default(),
                        status: statuses.get(&(view.vip, r.addr)).cloned(),
                        slow_start: real.and_then(|x| x.ramp),
                    }
                })
                .collect();
            VipStatus { view, health }
        })
        .collect();
    Ok(Json(Status {
        iface: ctx.iface.name.clone(),
        reconciles: ctx.sources.activity.reconcile_count(),
        conntrack: Conntrack {
            entries: flows.entries,
            capacity: ctx.sources.reader.flow_capacity(),
            counted_ms_ago: flows
                .at
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
        },
        last_reload: ctx.sources.activity.last_reload(),
        zeroed_at: ctx.baseline.zeroed_at(),
        vips,
        node: ctx.sources.node.status(),
        store: ctx.store.as_ref().map(crate::store::Store::status),
    }))
}

async fn fleet(
    AxState(ctx): AxState<Context>,
    _: NoBody,
) -> ApiResult<Json<crate::store::api::Fleet>> {
    let store = ctx.store.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        message: "this daemon is not in a fleet: start it with --store (docs/cluster.md)".into(),
    })?;
    Ok(Json(store.fleet()))
}

async fn stats(AxState(ctx): AxState<Context>, _: NoBody) -> ApiResult<Json<Stats>> {
    let mut stats = raw_stats(&ctx).await?;
    ctx.baseline.stats(&mut stats);
    Ok(Json(stats))
}

async fn zero(AxState(ctx): AxState<Context>, _: NoBody) -> ApiResult<Json<Zeroed>> {
    let zeroed_at = unix_now();
    ctx.baseline.zero(&raw_stats(&ctx).await?, zeroed_at);
    tracing::info!("counters shown by the CLI zeroed (metrics keep counting)");
    Ok(Json(Zeroed { zeroed_at }))
}

/// Every counter as the data path holds it (not zeroed).
async fn raw_stats(ctx: &Context) -> ApiResult<Stats> {
    let reader = &ctx.sources.reader;
    let verdicts = reader
        .verdicts()?
        .iter()
        .zip(stat::VERDICT_NAMES)
        .map(|(c, name)| VerdictStat {
            name: name.to_owned(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    let events = reader
        .events()?
        .into_iter()
        .map(|(name, count)| EventStat {
            name: name.to_owned(),
            count,
        })
        .collect();
    let flows = ctx.sources.flows.fresh(Duration::ZERO).await;
    Ok(Stats {
        verdicts,
        events,
        vips: views::vips(&ctx.sources.handle.snapshot(), reader, &flows)?,
        zeroed_at: None,
    })
}

/// Query of `GET /v1/simulate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateQuery {
    vip: String,
    src: String,
}

async fn simulate(
    AxState(ctx): AxState<Context>,
    q: Result<Query<SimulateQuery>, QueryRejection>,
    _: NoBody,
) -> ApiResult<Json<Simulated>> {
    let Query(q) = q?;
    let (vip, hash) = flow_of(&ctx, &q.vip, &q.src)?;
    let real = ctx.sources.handle.simulate(vip, hash).await?;
    Ok(Json(Simulated { real }))
}

/// The VIP and the data path's hash of the flow from `src` to `vip`.
fn flow_of(ctx: &Context, vip: &str, src: &str) -> ApiResult<(Vip, u32)> {
    let vip: Vip = vip.parse().map_err(parse_err)?;
    let src = crate::model::parse_source(src).map_err(ApiError::bad_request)?;
    if src.is_ipv4() != vip.addr.is_ipv4() {
        let family = |a: std::net::IpAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(ApiError::bad_request(format!(
            "source {} is {} and VIP {vip} is {}: a flow has one address family",
            src.ip(),
            family(src.ip()),
            family(vip.addr)
        )));
    }
    let snap = ctx.sources.handle.snapshot();
    let scheduler = snap
        .desired()
        .services
        .get(&vip)
        .map(|s| s.options.scheduler)
        .ok_or(SpecError::UnknownVip(vip))?;
    let (s, _) = addr_bytes(src.ip());
    let (d, _) = addr_bytes(vip.addr);
    let hash = match scheduler {
        Scheduler::Maglev => flow_hash(
            &s,
            &d,
            (u32::from(src.port()) << 16) | u32::from(vip.port),
            vip.proto.number(),
        ),
        Scheduler::MaglevSrc => src_hash(&s),
    };
    Ok((vip, hash))
}

/// Most flows one `POST /v1/simulate` may ask about (its body stays under the
/// API's body limit).
const MAX_SIMULATE_FLOWS: usize = 20_000;

async fn simulate_batch(
    AxState(ctx): AxState<Context>,
    body: Result<Json<SimulateBatch>, JsonRejection>,
) -> ApiResult<Json<SimulatedBatch>> {
    let Json(body) = body?;
    if body.flows.len() > MAX_SIMULATE_FLOWS {
        return Err(ApiError::bad_request(format!(
            "{} flows: at most {MAX_SIMULATE_FLOWS} per request",
            body.flows.len()
        )));
    }
    let mut flows = Vec::with_capacity(body.flows.len());
    for (i, f) in body.flows.iter().enumerate() {
        // The flow's own status: an unknown VIP is a 404, as for one flow.
        let flow = flow_of(&ctx, &f.vip, &f.src).map_err(|e| ApiError {
            status: e.status,
            message: format!("flows[{i}]: {}", e.message),
        })?;
        flows.push(flow);
    }
    let mut reals = Vec::with_capacity(flows.len());
    for (vip, hash) in flows {
        reals.push(ctx.sources.handle.simulate(vip, hash).await?);
    }
    Ok(Json(SimulatedBatch { reals }))
}
