/**
 * Deployments and applications (as Ray Serve's): `deployment(ActorClass, options)` says how a
 * class is served (replicas, load per replica, health, resources), `.bind(...args)` gives its
 * constructor's arguments, and an argument that is itself a bound deployment becomes a
 * DeploymentHandle to that deployment in each replica: one ingress and the deployments it calls,
 * deployed together by serve.run().
 */
import { InvalidArgumentError } from '../errors.js';
import type { FunctionDescriptor } from '../core/protocol.js';
import { descriptorOf, handleMethods, lookupRegistered, type ActorClass } from '../core/registry.js';
import type { DeploymentHandleBase } from './handle.js';
import { resolveDeploymentOptions, type DeploymentConfig, type DeploymentOptions } from './options.js';

type AnyClass = new (...args: any[]) => any;

/** A constructor's arguments at bind(): where it takes a handle, a bound deployment may stand in. */
export type BindArgs<A extends unknown[]> = { [I in keyof A]: A[I] | (A[I] extends DeploymentHandleBase ? Application<any> : never) };

export class Deployment<C extends AnyClass = AnyClass> {
  readonly actorClass: ActorClass<any>;
  readonly config: DeploymentConfig;
  /** Where replicas find the class: its module and name. */
  readonly descriptor: FunctionDescriptor;
  /** Its methods as handles carry them (a generator method's name starts with '*'). */
  readonly methods: string[];
  readonly #given: DeploymentOptions;

  /** @internal made by deployment(). */
  constructor(actorClass: ActorClass<any>, given: DeploymentOptions) {
    const descriptor = descriptorOf(actorClass);
    if (!descriptor || typeof (actorClass as { remote?: unknown }).remote !== 'function') {
      throw new InvalidArgumentError('deployment() takes an actor class made by remote(import.meta, SomeClass)');
    }
    const cls = lookupRegistered(descriptor);
    if (typeof cls !== 'function') throw new InvalidArgumentError(`deployment(): ${descriptor.name} is not registered in this process`);
    this.actorClass = actorClass;
    this.descriptor = descriptor;
    this.methods = handleMethods(cls as new (...args: unknown[]) => unknown);
    this.#given = given;
    this.config = resolveDeploymentOptions(descriptor.name, given);
  }

  get name(): string {
    return this.config.name;
  }

  /** This deployment with some options changed (the others kept). */
  options(more: DeploymentOptions): Deployment<C> {
    const merged: DeploymentOptions = { ...this.#given, ...more };
    // One way of sizing at a time: the newer one replaces the older.
    if (more.autoscaling !== undefined) delete merged.numReplicas;
    if (more.numReplicas !== undefined) delete merged.autoscaling;
    return new Deployment<C>(this.actorClass, merged);
  }

  /** The deployment with its constructor's arguments: an application, or a part of one. */
  bind(...args: BindArgs<ConstructorParameters<C>>): Application<InstanceType<C>> {
    return new Application<InstanceType<C>>(this, args);
  }
}

/** A bound deployment: serve.run() deploys it and every deployment among its arguments. */
export class Application<T = unknown> {
  readonly deployment: Deployment;
  readonly args: readonly unknown[];
  /** Only for typing: the instance type a handle to this application calls. */
  declare readonly __instance?: T;

  /** @internal made by Deployment.bind(). */
  constructor(deployment: Deployment, args: unknown[]) {
    this.deployment = deployment;
    this.args = args;
  }
}

/** How `actorClass` is served: see DeploymentOptions. */
export function deployment<C extends AnyClass>(actorClass: ActorClass<C>, options: DeploymentOptions = {}): Deployment<C> {
  return new Deployment<C>(actorClass, options);
}

/**
 * An application's deployments, each once, those it depends on before it: a deployment bound
 * twice under one name is an error, as two deployments of one name would be.
 */
export function deploymentsOf(root: Application): Application[] {
  const order: Application[] = [];
  const names = new Map<string, Application>();
  const visiting = new Set<Application>();
  const visit = (app: Application, depth: number) => {
    if (depth > 64) throw new InvalidArgumentError('an application nests more than 64 deployments deep');
    if (order.includes(app)) return;
    if (visiting.has(app)) throw new InvalidArgumentError(`deployment ${app.deployment.name} depends on itself`);
    const same = names.get(app.deployment.name);
    if (same && same !== app) {
      throw new InvalidArgumentError(`two deployments in one application are named ${app.deployment.name}: give one another name with .options({ name })`);
    }
    names.set(app.deployment.name, app);
    visiting.add(app);
    for (const arg of app.args) {
      for (const inner of applicationsIn(arg, 0)) visit(inner, depth + 1);
    }
    visiting.delete(app);
    order.push(app);
  };
  visit(root, 0);
  return order;
}

/** Bound deployments among an argument (in arrays and plain objects too). */
function applicationsIn(value: unknown, depth: number): Application[] {
  if (value instanceof Application) return [value];
  if (depth > 16 || typeof value !== 'object' || value === null) return [];
  if (Array.isArray(value)) return value.flatMap((item) => applicationsIn(item, depth + 1));
  if (Object.getPrototypeOf(value) !== Object.prototype) return [];
  return Object.values(value).flatMap((item) => applicationsIn(item, depth + 1));
}

/** An argument with each bound deployment in it replaced by `replace(app)`. */
export function replaceApplications(value: unknown, replace: (app: Application) => unknown, depth = 0): unknown {
  if (value instanceof Application) return replace(value);
  if (depth > 16 || typeof value !== 'object' || value === null) return value;
  if (Array.isArray(value)) return value.map((item) => replaceApplications(item, replace, depth + 1));
  if (Object.getPrototypeOf(value) !== Object.prototype) return value;
  return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, replaceApplications(item, replace, depth + 1)]));
}
