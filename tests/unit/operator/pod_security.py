"""A checker of the Pod Security Standards' `restricted` profile (which includes `baseline`) for one pod spec.

Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (v1.30+ policy);
`violations(pod_spec)` returns one line per broken rule, [] when the pod would be admitted in a
namespace labelled `pod-security.kubernetes.io/enforce: restricted`.

    baseline   hostNetwork, hostPID, hostIPC unset/false; no privileged container; capabilities added
               only from the baseline list; no hostPath volume; no hostPort (unset or 0); AppArmor
               unset/RuntimeDefault/Localhost; SELinux type unset or container_t/init_t/kvm_t and no
               user/role; procMount unset/Default; seccomp not Unconfined; only the safe sysctls;
               no Windows hostProcess
    restricted volumes only configMap, csi, downwardAPI, emptyDir, ephemeral, persistentVolumeClaim,
               projected, secret; allowPrivilegeEscalation false in every container; runAsNonRoot true
               (pod, or every container) and never false in a container; runAsUser never 0; seccomp
               RuntimeDefault or Localhost (pod, or every container); capabilities drop ALL and add
               at most NET_BIND_SERVICE
"""

from __future__ import annotations

BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_CAPS = {"NET_BIND_SERVICE"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}
APPARMOR_OK = {"RuntimeDefault", "Localhost"}


def _containers(spec: dict) -> list[dict]:
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or []),
            *(spec.get("ephemeralContainers") or [])]


def _selinux(where: str, sc: dict) -> list[str]:
    o = sc.get("seLinuxOptions") or {}
    out = []
    if o.get("type", "") not in SELINUX_TYPES:
        out.append(f"{where}: seLinuxOptions.type {o['type']!r}")
    if o.get("user") or o.get("role"):
        out.append(f"{where}: seLinuxOptions.user/role set")
    return out


def _apparmor(where: str, sc: dict) -> list[str]:
    t = (sc.get("appArmorProfile") or {}).get("type")
    return [f"{where}: appArmorProfile {t}"] if t is not None and t not in APPARMOR_OK else []


def violations(spec: dict) -> list[str]:
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    # -- baseline
    for k in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(k):
            out.append(f"pod: {k}")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if "hostPath" in kinds:
            out.append(f"volume {v['name']}: hostPath")
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: {sorted(kinds - RESTRICTED_VOLUMES)} not allowed")
    for s in psc.get("sysctls") or []:
        if s["name"] not in SAFE_SYSCTLS:
            out.append(f"pod: sysctl {s['name']}")
    out += _selinux("pod", psc) + _apparmor("pod", psc)
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod: windowsOptions.hostProcess")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_OK:
        out.append(f"pod: seccompProfile {pod_seccomp}")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    for c in _containers(spec):
        where = f"container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"{where}: hostPort {p['hostPort']}")
        out += _selinux(where, sc) + _apparmor(where, sc)
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount {sc['procMount']}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: windowsOptions.hostProcess")
        caps = sc.get("capabilities") or {}
        added = set(caps.get("add") or [])
        if added - BASELINE_CAPS:
            out.append(f"{where}: capabilities.add {sorted(added - BASELINE_CAPS)} (baseline)")
        # -- restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot") is False or (sc.get("runAsNonRoot") is not True and psc.get("runAsNonRoot") is not True):
            out.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_OK:
            out.append(f"{where}: seccompProfile {seccomp} (RuntimeDefault or Localhost required)")
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities.drop lacks ALL")
        if added - RESTRICTED_CAPS:
            out.append(f"{where}: capabilities.add {sorted(added - RESTRICTED_CAPS)}")
    return out
