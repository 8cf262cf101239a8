"""Cluster configs (Ray cluster launcher, KubeRay, the job runtime env), shipped with the
package so `otmel submit` finds runtime_env.yaml in any install."""
