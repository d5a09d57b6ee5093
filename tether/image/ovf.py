"""OVF 1.x descriptor for the appliance: write it, and read it back.

One concern: the XML. The OVA packaging (tar, manifest, disk) lives in
`tether.image.ova`; the disk format in `tether.image.vmdk`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

NS = {
    "ovf": "http://schemas.dmtf.org/ovf/envelope/1",
    "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
    "vssd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData",
    "vmw": "http://www.vmware.com/schema/ovf",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
}
for _prefix, _uri in NS.items():
    ET.register_namespace(_prefix, _uri)

VMDK_FORMAT = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
# vSphere offers both: guestinfo.ovfEnv through VMware Tools, and an ISO with
# ovf-env.xml on the CD-ROM when tools are not running yet.
OVF_TRANSPORT = "com.vmware.guestInfo iso"
# CIM_ResourceAllocationSettingData ResourceType values used below.
RT_CPU, RT_MEMORY, RT_IDE, RT_NIC, RT_CDROM, RT_DISK, RT_OTHER_STORAGE = 3, 4, 5, 10, 15, 17, 20
NETWORK_NAME = "VM Network"


@dataclass(frozen=True)
class VsphereTarget:
    """The oldest vSphere release the appliance OVA supports, and what follows from it.

    ESXi 6.5 (virtual hardware vmx-13) is the first release with a virtual
    NVMe controller, which the appliance uses because the Debian cloud kernel
    carries nvme but not pvscsi/LSI/AHCI. Everything else in the descriptor is
    held to what 6.5 knows: guest OS id `debian10_64Guest` (the newest Debian
    id 6.5 has; `debian12_64Guest` exists only from 8.0 and older hosts map an
    unknown id to "Other (32-bit)"), CIM OS id 96 "Debian 64-Bit", controller subtype
    `vmware.nvme.controller` (ResourceType 20), NIC `VmxNet3`, BIOS firmware.
    Newer ESXi releases run vmx-13 machines unchanged.
    """

    esxi: str = "6.5"
    hardware: str = "vmx-13"
    guest_os: str = "debian10_64Guest"
    cim_os_id: int = 96
    controller: str = "vmware.nvme.controller"
    nic: str = "VmxNet3"
    firmware: str = "bios"


MIN_VSPHERE = VsphereTarget()


@dataclass(frozen=True)
class Hardware:
    """Sizing the appliance's self-check expects: 4 vCPU, 8 GiB RAM, one 16 GiB disk.

    `cdrom` adds an optional IDE CD-ROM: vSphere's ISO transport needs a
    CD-ROM drive to attach ovf-env.xml to (the guest then needs ata_piix,
    sr_mod and isofs to read it).
    """

    cpus: int = 4
    memory_mb: int = 8192
    cdrom: bool = True


@dataclass(frozen=True)
class Property:
    """One ProductSection property the operator fills in at deploy time."""

    key: str
    label: str
    description: str
    default: str = ""
    category: str = "Network"
    choices: tuple[str, ...] = ()
    user_configurable: bool = True


# The first-boot parser (tether.agent.firstboot) reads exactly these keys.
PROPERTIES: tuple[Property, ...] = (
    Property("hostname", "Hostname", "Host name of the appliance; empty keeps the default."),
    Property("network.mode", "Address mode", "dhcp, or static to use the address below.",
             default="dhcp", choices=("dhcp", "static")),
    Property("network.address", "IP address", "Static IPv4 or IPv6 address (static mode only)."),
    Property("network.prefix", "Netmask or prefix",
             "Prefix length (24) or netmask (255.255.255.0) for the static address."),
    Property("network.gateway", "Gateway", "Default gateway (static mode only)."),
    Property("network.dns", "DNS servers", "Comma-separated DNS server addresses."),
    Property("network.ntp", "NTP servers", "Comma-separated NTP server names or addresses."),
    Property("proxy.url", "HTTP proxy URL",
             "HTTP CONNECT proxy for the connection home, e.g. http://proxy.example:3128.",
             category="Home"),
    Property("home.url", "Home URL",
             "Comma-separated wss:// URLs of the control plane; empty keeps the built-in ones.",
             category="Home"),
)


@dataclass(frozen=True)
class DiskRef:
    """The disk file inside the OVA as the descriptor references it."""

    href: str
    size: int
    capacity: int
    populated: int


@dataclass(frozen=True)
class Product:
    """What the ProductSection and annotation say about this build."""

    name: str
    version: str
    image_id: str = ""
    vendor: str = "tether"


def build_descriptor(disk: DiskRef, product: Product, hw: Hardware = Hardware(),
                     target: VsphereTarget = MIN_VSPHERE) -> bytes:
    """Return the OVF envelope (UTF-8 XML) for one appliance VM with one disk."""
    env = ET.Element(_q("ovf", "Envelope"))
    refs = ET.SubElement(env, _q("ovf", "References"))
    ET.SubElement(refs, _q("ovf", "File"), _attrs(href=disk.href, id="file1", size=str(disk.size)))
    _disk_section(env, disk)
    _network_section(env)
    _virtual_system(env, product, hw, target)
    ET.indent(env)
    return ET.tostring(env, encoding="utf-8", xml_declaration=True) + b"\n"


def _disk_section(env: ET.Element, disk: DiskRef) -> None:
    section = _section(env, "DiskSection", "Virtual disk information")
    ET.SubElement(section, _q("ovf", "Disk"), _attrs(
        capacity=str(disk.capacity), capacityAllocationUnits="byte", diskId="vmdisk1",
        fileRef="file1", format=VMDK_FORMAT, populatedSize=str(disk.populated)))


def _network_section(env: ET.Element) -> None:
    section = _section(env, "NetworkSection", "The list of logical networks")
    net = ET.SubElement(section, _q("ovf", "Network"), _attrs(name=NETWORK_NAME))
    _text(net, "ovf", "Description", "Network with a route to home (outbound TCP 443)")


def _virtual_system(env: ET.Element, product: Product, hw: Hardware,
                    target: VsphereTarget) -> None:
    vs = ET.SubElement(env, _q("ovf", "VirtualSystem"), _attrs(id=product.name))
    _text(vs, "ovf", "Info", "tether identity connector appliance")
    _text(vs, "ovf", "Name", product.name)
    notes = _section(vs, "AnnotationSection", "A human-readable annotation")
    _text(notes, "ovf", "Annotation",
          f"tether identity connector {product.version}, image {product.image_id}. "
          "No management interface: configure with the properties below, then power on.")
    os_section = _section(vs, "OperatingSystemSection", "The guest operating system",
                          id=str(target.cim_os_id))
    os_section.set(_q("vmw", "osType"), target.guest_os)
    _text(os_section, "ovf", "Description", "Debian GNU/Linux 12 (64-bit)")
    _hardware_section(vs, hw, target)
    _product_section(vs, product)


def _hardware_section(vs: ET.Element, hw: Hardware, target: VsphereTarget) -> None:
    section = _section(vs, "VirtualHardwareSection", "Virtual hardware requirements",
                       transport=OVF_TRANSPORT)
    system = ET.SubElement(section, _q("ovf", "System"))
    for tag, value in (("ElementName", "Virtual Hardware Family"), ("InstanceID", "0"),
                       ("VirtualSystemIdentifier", "tether"),
                       ("VirtualSystemType", target.hardware)):
        _text(system, "vssd", tag, value)
    _item(section, "1", RT_CPU, f"{hw.cpus} virtual CPU(s)", AllocationUnits="hertz * 10^6",
          VirtualQuantity=str(hw.cpus))
    _item(section, "2", RT_MEMORY, f"{hw.memory_mb}MB of memory",
          AllocationUnits="byte * 2^20", VirtualQuantity=str(hw.memory_mb))
    _item(section, "3", RT_OTHER_STORAGE, "NVMe Controller 0", Address="0",
          ResourceSubType=target.controller)
    _item(section, "4", RT_DISK, "Hard Disk 1", AddressOnParent="0",
          HostResource="ovf:/disk/vmdisk1", Parent="3")
    _item(section, "5", RT_NIC, "Network adapter 1", AddressOnParent="0",
          AutomaticAllocation="true", Connection=NETWORK_NAME, ResourceSubType=target.nic)
    if hw.cdrom:
        _item(section, "6", RT_IDE, "IDE Controller 0", Address="0", required=False)
        _item(section, "7", RT_CDROM, "CD/DVD Drive 1", AddressOnParent="0",
              AutomaticAllocation="false", Parent="6", ResourceSubType="vmware.cdrom.atapi",
              required=False)
    for key, value in (("firmware", target.firmware), ("tools.syncTimeWithHost", "false")):
        ET.SubElement(section, _q("vmw", "Config"),
                      {_q("ovf", "required"): "false", _q("vmw", "key"): key,
                       _q("vmw", "value"): value})


def _item(section: ET.Element, instance: str, rtype: int, name: str,
          required: bool = True, **fields: str) -> None:
    """Append one RASD Item; children in the alphabetical order the CIM schema requires."""
    item = ET.SubElement(section, _q("ovf", "Item"))
    if not required:
        item.set(_q("ovf", "required"), "false")
    fields.update(ElementName=name, InstanceID=instance, ResourceType=str(rtype))
    for tag in sorted(fields):
        _text(item, "rasd", tag, fields[tag])


def _product_section(vs: ET.Element, product: Product) -> None:
    section = _section(vs, "ProductSection", "Appliance settings read at first boot")
    for tag, value in (("Product", "tether identity connector"), ("Vendor", product.vendor),
                       ("Version", product.version), ("FullVersion", product.version)):
        _text(section, "ovf", tag, value)
    category = None
    for prop in PROPERTIES:
        if prop.category != category:
            category = prop.category
            _text(section, "ovf", "Category", category)
        _property(section, prop)
    _property(section, Property("image.id", "Image id", "This image's identity (read-only).",
                                default=product.image_id, user_configurable=False))


def _property(section: ET.Element, prop: Property) -> None:
    attrs = _attrs(key=prop.key, type="string",
                   userConfigurable="true" if prop.user_configurable else "false",
                   value=prop.default)
    if prop.choices:
        attrs[_q("ovf", "qualifiers")] = "ValueMap{%s}" % ",".join(f'"{c}"' for c in prop.choices)
    element = ET.SubElement(section, _q("ovf", "Property"), attrs)
    _text(element, "ovf", "Label", prop.label)
    _text(element, "ovf", "Description", prop.description)


def _section(parent: ET.Element, tag: str, info: str, **attrs: str) -> ET.Element:
    section = ET.SubElement(parent, _q("ovf", tag), _attrs(**attrs))
    _text(section, "ovf", "Info", info)
    return section


def _text(parent: ET.Element, prefix: str, tag: str, value: str) -> ET.Element:
    element = ET.SubElement(parent, _q(prefix, tag))
    element.text = value
    return element


def _attrs(**values: str) -> dict[str, str]:
    return {_q("ovf", key): value for key, value in values.items()}


def _q(prefix: str, tag: str) -> str:
    return f"{{{NS[prefix]}}}{tag}"


# ---------------------------------------------------------------- reading back


@dataclass
class OvfSummary:
    """What an OVF descriptor declares, as plain values for checks and tests."""

    files: dict[str, int] = field(default_factory=dict)
    disks: list[dict] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    hardware: str = ""
    guest_os: str = ""
    cim_os_id: str = ""
    transport: str = ""
    items: list[dict] = field(default_factory=list)
    properties: dict[str, dict] = field(default_factory=dict)

    def items_of(self, rtype: int) -> list[dict]:
        return [i for i in self.items if i.get("ResourceType") == str(rtype)]


def parse_descriptor(data: bytes) -> OvfSummary:
    """Parse an OVF envelope; raise ValueError saying what is missing."""
    try:
        env = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"OVF descriptor is not well-formed XML: {exc}") from None
    if env.tag != _q("ovf", "Envelope"):
        raise ValueError(f"OVF root element is {env.tag}, expected ovf:Envelope")
    out = OvfSummary()
    for f in env.iterfind("ovf:References/ovf:File", NS):
        out.files[f.get(_q("ovf", "href"), "")] = int(f.get(_q("ovf", "size"), "-1"))
    out.disks = [{k.split("}")[1]: v for k, v in d.attrib.items()}
                 for d in env.iterfind("ovf:DiskSection/ovf:Disk", NS)]
    out.networks = [n.get(_q("ovf", "name"), "")
                    for n in env.iterfind("ovf:NetworkSection/ovf:Network", NS)]
    vs = env.find("ovf:VirtualSystem", NS)
    if vs is None:
        raise ValueError("OVF descriptor has no VirtualSystem")
    _parse_system(vs, out)
    return out


def _parse_system(vs: ET.Element, out: OvfSummary) -> None:
    os_section = vs.find("ovf:OperatingSystemSection", NS)
    if os_section is not None:
        out.cim_os_id = os_section.get(_q("ovf", "id"), "")
        out.guest_os = os_section.get(_q("vmw", "osType"), "")
    hw = vs.find("ovf:VirtualHardwareSection", NS)
    if hw is None:
        raise ValueError("OVF VirtualSystem has no VirtualHardwareSection")
    out.transport = hw.get(_q("ovf", "transport"), "")
    out.hardware = hw.findtext("ovf:System/vssd:VirtualSystemType", "", NS)
    for item in hw.iterfind("ovf:Item", NS):
        out.items.append({child.tag.split("}")[1]: child.text or "" for child in item})
    for prop in vs.iterfind("ovf:ProductSection/ovf:Property", NS):
        out.properties[prop.get(_q("ovf", "key"), "")] = {
            k.split("}")[1]: v for k, v in prop.attrib.items()}
