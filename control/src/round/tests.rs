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

/// A controller over two components with `forecast`.
fn pair(forecast: ForecastConfig) -> Controller {
    let component = |name: &str| Component {
        name: name.into(),
        weight: 3.0,
        deferrable: false,
        preferences: Preferences::default(),
    };
    let engine = Engine::new(
        AllocConfig::default(),
        vec![component("a"), component("b")],
        [Some(8.0), None, None, None],
        vec![[1.0; 4]; 2],
    )
    .unwrap();
    Controller::new(
        engine,
        vec![
            Target::new("a", "a").unwrap(),
            Target::new("b", "b").unwrap(),
        ],
        Box::new(DryRun::default()),
        Units::native(0.9),
        forecast,
    )
    .unwrap()
}

/// Round t's usage: a daily cycle of 24 rounds, at two sizes.
fn cycle(t: usize) -> Vec<PerResource<f64>> {
    let v = 2.0 + (t as f64 * std::f64::consts::TAU / 24.0).sin();
    vec![[v, 1e8 * v, 1e3, 1e3], [3.0 * v, 2e8, 1e4 * v, 10.0]]
}

#[test]
fn the_global_lstm_serves_every_component_and_resumes_its_training() {
    let global = ForecastConfig {
        horizon: 6,
        global: true,
        ..ForecastConfig::default()
    };
    let mut c = pair(global);
    assert_eq!(c.model_names().last(), Some(&"global_lstm"));
    for t in 0..120 {
        c.set_clock(1_375_660_800.0 + 3600.0 * t as f64);
        c.observe(&cycle(t));
    }
    // A clock set is the time of the next round only; later rounds are the wall clock's.
    assert!(c.clock.is_none());
    let stats = c.global_stats().unwrap();
    assert_eq!((stats.series, stats.rounds), (8, 120));
    // A step from the first round with a window and its horizon kept (48 + 6 rows).
    assert_eq!(stats.steps, 120 - 54 + 1);
    let g = c.model_names().len() - 1;
    for (comp, r) in [(0, Resource::Cpu), (1, Resource::Net)] {
        // It was handed a forecast every round from its window on, and scored.
        let errors = c.rolling_error(comp, r, 6);
        assert!(errors[g].is_some_and(f64::is_finite), "{errors:?}");
        assert!(c.forecast(comp, r).iter().all(|s| s.mean.is_finite()));
    }
    // A restart resumes the weights and their record; another shape is refused.
    let weights = c.global_checkpoint().unwrap().unwrap();
    let mut again = pair(global);
    again.resume_global(&weights).unwrap();
    assert_eq!(again.global_stats().unwrap().steps, stats.steps);
    assert_eq!(again.global_stats().unwrap().series, 8);
    let mut other = pair(ForecastConfig {
        horizon: 12,
        ..global
    });
    assert!(other.resume_global(&weights).is_err());
    assert_eq!(other.global_stats().unwrap().steps, 0);
    // Off, there is none to resume.
    let mut off = pair(ForecastConfig::default());
    assert!(off.global_stats().is_none() && off.global_checkpoint().is_none());
    assert!(off.resume_global(&weights).is_err());
}
