use super::*;
use forestall_actuators::DryRun;
use forestall_actuators::alloc::{Action, Component, Preferences};

/// One component holding one core, whose raise to `held_at` cores was rolled back and is
/// held off until round 100.
fn held(held_at: f64) -> Controller {
    let svc = Component {
        name: "svc".into(),
        weight: 3.0,
        deferrable: false,
        preferences: Preferences::default(),
    };
    let config = AllocConfig::default();
    let mut engine = Engine::new(
        config,
        vec![svc],
        [Some(8.0), None, None, None],
        vec![[1.0; 4]],
    )
    .unwrap();
    let mut state = engine.learned();
    state.components[0].held_until = [100; 4];
    state.components[0].held_at = [held_at; 4];
    assert_eq!(engine.resume(&state), 1);
    let units = Units::native(0.9);
    Controller::new(
        engine,
        vec![Target::new("svc", "svc").unwrap()],
        Box::new(DryRun::default()),
        units,
        ForecastConfig::default(),
    )
    .unwrap()
}

fn ask(demand: Option<f64>, forecast: Option<f64>) -> Demand {
    Demand {
        query: "latency".into(),
        component: 0,
        resource: Resource::Cpu,
        demand,
        forecast,
        risk: None,
    }
}

/// A query's demand is a need observed now (latency over its objective): a hold-off after a
/// rolled-back raise does not delay it, as it delays a forecast of the level judged wrong.
#[test]
fn a_demand_is_not_held_off_by_a_rollback_but_a_forecast_of_the_same_level_is() {
    let mut c = held(3.0);
    let report = c.raise_now(1, &[ask(None, Some(1.5))]);
    assert!(report.decisions.is_empty(), "{:?}", report.decisions);
    assert_eq!(c.engine().allocation(0)[0], 1.0);

    let report = c.raise_now(1, &[ask(Some(2.0), None)]);
    let raise = report
        .decisions
        .iter()
        .find(|d| d.action == Action::Raise)
        .expect("raised");
    assert!(
        raise.reason.ends_with("asked by query latency"),
        "{raise:?}"
    );
    assert!(c.engine().allocation(0)[0] >= 2.0);
}
