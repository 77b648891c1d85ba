// Validates Kubernetes objects (a JSON array on stdin) against the schemas
// the kubernetes-models packages publish (generated from the Kubernetes
// OpenAPI and the Istio and Gateway API CRDs). Prints one JSON line per
// object: {kind, name, schema: <module> | null, errors: <message> | null}.
import { readFileSync } from "node:fs";

const objects = JSON.parse(readFileSync(0, "utf8"));

function modulePath(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (group === "") return `kubernetes-models/${version}/${kind}`;
  if (group.endsWith(".istio.io")) return `@kubernetes-models/istio/${group}/${version}/${kind}`;
  if (group.endsWith("gateway.networking.k8s.io")) return `@kubernetes-models/gateway-api/${group}/${version}/${kind}`;
  if (!group.includes(".")) return `kubernetes-models/${group}/${version}/${kind}`;
  return null; // no published schema installed for this group
}

for (const object of objects) {
  const path = modulePath(object.apiVersion, object.kind);
  const result = { kind: object.kind, apiVersion: object.apiVersion, name: object.metadata?.name, schema: null, errors: null };
  if (path) {
    let model;
    try {
      model = (await import(path))[object.kind];
    } catch {
      model = undefined;
    }
    if (model) {
      result.schema = path;
      try {
        new model(object).validate();
      } catch (e) {
        result.errors = e.message;
      }
    }
  }
  console.log(JSON.stringify(result));
}
